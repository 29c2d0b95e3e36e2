"""Cosine and negative-L2 attention scores: every exact backend equals softmax of the explicit float64 score
matrix (padding, causal, fully masked rows, GQA, cross-attention), gradients reach the cosine temperature,
cached decoding equals the full pass, models learn, and the approximate backends refuse clearly."""

import contextlib
import math

import pytest
import torch

from tformer import backends
from tformer import config as config_module
from tformer.attention import MultiHeadAttention
from tformer.attention import scores as scores_module
from tformer.attention.chunked import chunked_attention
from tformer.attention.local import band_mask
from tformer.attention.scores import AttentionScore
from tformer.config import ConfigError, LMConfig, ModelConfig
from tformer.models import LanguageModel, Seq2Seq

C, H = 24, 4


def reference(mha, x, memory, allowed, score):
    """Float64 attention from the explicit (B, H, T, S) score matrix; `allowed` (B, 1, T, S) or None."""
    w, b = (t.double() for t in mha.in_projection())
    d, kv = mha.d_head, mha.kv_dim
    src = x if memory is None else memory
    q = (x.double() @ w[:C].T + b[:C]).unflatten(-1, (H, d)).transpose(1, 2)  # (B, H, T, D)
    k = (src.double() @ w[C : C + kv].T + b[C : C + kv]).unflatten(-1, (-1, d)).transpose(1, 2)
    v = (src.double() @ w[C + kv :].T + b[C + kv :]).unflatten(-1, (-1, d)).transpose(1, 2)
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if score == "cosine":
        tau = mha.score.log_temperature.double().exp().view(H, 1, 1)
        s = tau * (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-2, -1)
    else:  # -||q_i - k_j||^2 / sqrt(D), written out
        s = -(q[:, :, :, None, :] - k[:, :, None, :, :]).square().sum(-1) / math.sqrt(d)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing to attend to: zeros
    out = (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], C)
    return out @ mha.out_proj.weight.double().T + mha.out_proj.bias.double(), p


def _inputs(t=9, s=11):
    x = torch.randn(3, t, C, dtype=torch.float64)
    memory = torch.randn(3, s, C, dtype=torch.float64)
    pad = torch.ones(3, 1, 1, s, dtype=torch.bool)
    pad[1, ..., s - 4 :] = False
    pad[2] = False  # a row with no key at all: zeros, never NaN
    return x, memory, pad


@pytest.mark.parametrize("score", ["cosine", "l2"])
@pytest.mark.parametrize("backend", ["math", "sdpa", "chunked", "local"])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_self_attention_equals_float64_formula(score, backend, n_kv):
    torch.manual_seed(0)
    t = 9
    mha = MultiHeadAttention(
        C, H, backend=backend, score=score, n_kv_heads=n_kv, backend_options={"window": 3}
    )
    mha = mha.double()
    if score == "cosine":  # distinct temperatures per head, so a wrong broadcast would show
        with torch.no_grad():
            mha.score.log_temperature.copy_(torch.linspace(0.5, 3.0, H))
    x, _, pad = _inputs(t, t)
    pad = pad[:, :, :, :t]
    allowed = pad & torch.ones(t, t, dtype=torch.bool).tril()
    if backend == "local":
        allowed = allowed & band_mask(t, t, 3, causal=True)
    out = mha(x, mask=pad, causal=True).out
    ref, _ = reference(mha, x, None, allowed, score)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # gradients of every parameter, the cosine temperature included, equal the formula's
    g = torch.randn_like(out)
    params = list(mha.parameters())
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for name, a, b in zip([n for n, _ in mha.named_parameters()], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0, msg=name)
    if score == "cosine":
        assert mha.score.log_temperature.grad is None  # autograd.grad does not accumulate
        assert got[[n for n, _ in mha.named_parameters()].index("score.log_temperature")].abs().min() > 0


@pytest.mark.parametrize("score", ["cosine", "l2"])
@pytest.mark.parametrize("backend", ["math", "sdpa", "chunked"])
def test_cross_attention_float32_and_weights(score, backend):
    torch.manual_seed(1)
    mha = MultiHeadAttention(C, H, backend=backend, score=score, cross=True)
    x, memory, pad = _inputs()
    ref, p = reference(mha, x, memory, pad, score)
    # float32 against float64: the l2 expansion 2 q.k - |k|^2 loses a few bits to cancellation, well
    # inside 1e-5 at these magnitudes (|q|, |k| ~ 1-3)
    out = mha(x.float(), memory.float(), mask=pad).out
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="using 'math'") if backend != "math" else contextlib.nullcontext():
        weights = mha.double()(x, memory, mask=pad, need_weights=True).weights
    torch.testing.assert_close(weights, p, atol=1e-12, rtol=0)


@pytest.mark.parametrize("score", ["cosine", "l2"])
def test_chunked_kernel_over_several_blocks(score):
    """The online softmax over blocks (block 4, lengths not multiples of it) with the augmented keys."""
    torch.manual_seed(2)
    sc = AttentionScore(score, 2, 8).double()
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, requires_grad=True) for n in (7, 10, 10))
    qs, ks = sc.queries(q), sc.keys(k)
    from tformer.attention import math_attention

    mask = torch.rand(2, 1, 7, 10) > 0.3
    out, _ = chunked_attention(qs, ks, v, mask, causal=True, scale=sc.scale, block_size=4)
    ref, _ = math_attention(qs, ks, v, mask, causal=True, scale=sc.scale)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    for a, b in zip(got, torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("score", ["cosine", "l2"])
def test_lm_cached_decoding_equals_full_pass(score):
    """Rotary positions and grouped-query heads, one token at a time through the KV cache."""
    torch.manual_seed(3)
    cfg = LMConfig(
        vocab_size=30, d_model=C, n_heads=H, n_kv_heads=2, d_ff=32, n_layers=2, max_seq_len=16,
        positions="rotary", attention_score=score,
    )  # fmt: skip
    model = LanguageModel(cfg).eval()
    ids = torch.randint(0, 30, (2, 10))
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    logits, cache = [out.logits], out.cache
    for i in range(4, 10):
        out = model(ids[:, i : i + 1], cache=cache)
        logits.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)
    assert cache is not None
    width = C // H + (1 if score == "l2" else 0)  # l2 caches the augmented keys [k, -|k|^2]
    assert cache.kv[0].k.shape == (2, 2, 10, width)


@pytest.mark.parametrize("score", ["cosine", "l2"])
def test_seq2seq_decode_step_equals_teacher_forcing(score):
    torch.manual_seed(4)
    cfg = ModelConfig(
        src_vocab_size=20, tgt_vocab_size=20, d_model=C, n_heads=H, d_ff=32, n_layers=2, max_seq_len=16,
        dropout=0.0, attention_score=score,
    )  # fmt: skip
    model = Seq2Seq(cfg).eval()
    src = torch.randint(4, 20, (2, 7))
    src[1, 5:] = 0  # padding
    tgt = torch.randint(4, 20, (2, 6))
    full = model(src, tgt).logits
    memory, memory_mask, _ = model.encode(src)
    cache = model.start_cache(memory, memory_mask)
    steps = []
    for i in range(6):
        o = model.decode_step(tgt[:, i : i + 1], cache)
        steps.append(o.logits)
        assert o.cache is not None
        cache = o.cache
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score", ["cosine", "l2"])
def test_lm_with_score_overfits_a_batch(score):
    """A tiny LM memorises 4 random sequences; the cosine temperature moves during training."""
    torch.manual_seed(5)
    cfg = LMConfig(
        vocab_size=16, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=12, attention_score=score
    )
    model = LanguageModel(cfg)
    ids = torch.randint(0, 16, (4, 13))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = None
    for _ in range(120):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))
        start = loss.item() if start is None else start
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start > 2.0 and loss.item() < 0.1, (start, loss.item())  # from ~log(16) = 2.77 to memorised
    if score == "cosine":
        temps = model.blocks.layers[0].self_attn.score.log_temperature
        assert not torch.allclose(temps, torch.full_like(temps, math.log(10.0)))


def test_config_and_backend_errors():
    with pytest.raises(ConfigError, match=r"attention_score = 'dist' is not one of dot, cosine, l2"):
        LMConfig(attention_score="dist")
    with pytest.raises(
        ConfigError, match=r"attention = 'performer' cannot compute attention_score = 'cosine'"
    ):
        LMConfig(attention="performer", attention_score="cosine")
    with pytest.raises(ConfigError, match="linformer"):
        ModelConfig(attention="linformer", attention_score="l2")
    with pytest.raises(ValueError, match=r"backend 'performer' cannot compute attention_score = 'l2'"):
        MultiHeadAttention(C, H, backend="performer", score="l2")
    with pytest.raises(ValueError, match="unknown attention score 'x'"):
        MultiHeadAttention(C, H, score="x")
    # the config (no torch) and the attention package read the same table (tformer/backends.py)
    assert config_module.ATTENTION_SCORES == scores_module.SCORES == backends.SCORES
    assert config_module.SCORE_BACKENDS == ("math", "sdpa", "chunked", "local")


def test_dot_score_adds_no_parameters():
    """The default keeps checkpoints of earlier versions loadable (strict loading)."""
    names = [n for n, _ in MultiHeadAttention(C, H).named_parameters()]
    assert names == ["in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias"]
    cross = [n for n, _ in MultiHeadAttention(C, H, cross=True).named_parameters()]
    assert cross == [f"{m}.{p}" for m in ("q_proj", "kv_proj", "out_proj") for p in ("weight", "bias")]
