"""tformer.accel as a transform: `apply` swaps modules and the attention backend entry in place, keeps
parameters, state-dict keys and results (within float32 summation order), is idempotent and reversible,
and `TFORMER_ACCEL=off` leaves PyTorch's own modules. Also the short low-precision attention kernel it
registers, against float64 and torch's fused kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tformer import accel
from tformer.accel import attention as accel_attention
from tformer.accel.linear import AccelLinear
from tformer.attention import MultiHeadAttention, math_attention, sdpa_attention
from tformer.config import LMConfig, ModelConfig
from tformer.inference.sampling import generate
from tformer.models import LanguageModel, Seq2Seq

H = 4


def _seq2seq() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(
        ModelConfig(src_vocab_size=40, tgt_vocab_size=45, d_model=32, n_heads=H, d_ff=64, n_layers=2)
    )


def _classes(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


def test_apply_keeps_parameters_and_keys_and_is_idempotent_and_reversible():
    model = _seq2seq()
    before = _classes(model)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    values = {k: v.clone() for k, v in model.state_dict().items()}
    assert accel.apply(model) is model
    n_linear = sum(t is nn.Linear for t in before)
    assert accel.describe(model) == {
        "attention:sdpa_lowp_cpu": 3 * 2,  # encoder self, decoder self and cross, 2 layers each
        "linear:accel": n_linear,
    }
    after = _classes(model)
    accel.apply(model)
    assert _classes(model) == after  # twice is once
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    for k, v in model.state_dict().items():
        assert torch.equal(v, values[k])
    accel.revert(model)
    assert _classes(model) == before
    assert {m.backend.name for m in model.modules() if isinstance(m, MultiHeadAttention)} == {"sdpa"}


def test_subclasses_of_linear_are_left_alone():
    """Only exact nn.Linear modules: a subclass (torch's own MultiheadAttention out_proj, an adapter's
    layer) keeps its forward."""
    mha = nn.MultiheadAttention(16, 4)
    accel.apply(mha)
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_results_equal_with_and_without_accel_values_and_gradients():
    model = _seq2seq().eval()  # no dropout; gradients still flow
    src, tgt = torch.randint(1, 40, (3, 7)), torch.randint(1, 45, (3, 6))

    def run():
        model.zero_grad()
        logits = model(src, tgt).logits
        (logits**2).mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_g = run()
    accel.apply(model)
    got, got_g = run()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_off_gives_stock_modules(monkeypatch):
    monkeypatch.setenv("TFORMER_ACCEL", "off")
    model = _seq2seq()
    before = _classes(model)
    accel.apply(model)
    assert _classes(model) == before and "linear:accel" not in accel.describe(model)
    monkeypatch.setenv("TFORMER_ACCEL", "fast")
    with pytest.raises(ValueError, match="TFORMER_ACCEL='fast': expected 'auto' \\(the default\\) or 'off'"):
        accel.apply(model)


def test_retired_linear_variable_warns(monkeypatch):
    monkeypatch.setenv("TFORMER_LINEAR", "aten")
    with pytest.warns(RuntimeWarning, match="TFORMER_LINEAR is no longer read"):
        accel.apply(nn.Sequential(nn.Linear(2, 2)))


def test_reverted_restores_exactly_what_was_applied():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].__class__ = AccelLinear  # only the first
    with accel.reverted(model):
        assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert [type(m) for m in model] == [AccelLinear, nn.Linear]


def test_compile_needs_accelerated_layers():
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(vocab_size=30, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_seq_len=16))
    with pytest.raises(ValueError, match="tformer.accel.apply"):
        generate(lm, torch.tensor([[1, 2]]), max_new_tokens=2, greedy=True, compile=True)


def test_cross_attention_rows_and_draws_are_the_packed_layers():
    """Cross-attention's q_proj and kv_proj hold the rows (and the random draws) of the packed in_proj it
    had in tformer <= 0.2, and load a state dict of that layout."""
    torch.manual_seed(0)
    packed = nn.Linear(32, 96)
    torch.manual_seed(0)
    cross = MultiHeadAttention(32, H, cross=True)
    assert torch.equal(cross.q_proj.weight, packed.weight[:32])
    assert torch.equal(cross.kv_proj.weight, packed.weight[32:])
    assert torch.equal(cross.kv_proj.bias, packed.bias[32:])
    old = {
        "in_proj.weight": torch.randn(96, 32),
        "in_proj.bias": torch.randn(96),
        "out_proj.weight": torch.randn(32, 32),
        "out_proj.bias": torch.randn(32),
    }
    cross.load_state_dict(old)  # strict
    weight, bias = cross.in_projection()
    assert torch.equal(weight, old["in_proj.weight"]) and torch.equal(bias, old["in_proj.bias"])


def test_self_and_cross_layers_refuse_the_other_use():
    x = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="cross=True"):
        MultiHeadAttention(16, H)(x, x)
    with pytest.raises(ValueError, match="needs `memory`"):
        MultiHeadAttention(16, H, cross=True)(x)


# --- the short low-precision attention kernel -------------------------------------------------------------
def _lowp_cases():
    """(name, T, S, mask, causal) for bfloat16 attention: the causal fast path, causal with a cache (T < S),
    padding with a fully masked query row, a per-head mask, odd lengths."""
    pad = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    pad[1, ..., 9:] = False
    rows = torch.ones(2, 1, 11, 13, dtype=torch.bool)
    rows[0, 0, 4] = False  # a query row that may attend to nothing
    heads = torch.rand(2, H, 11, 13, generator=torch.Generator().manual_seed(3)) > 0.3
    return [
        ("causal", 37, 37, None, False),
        ("causal-fast", 37, 37, None, True),
        ("cached", 5, 37, None, True),
        ("padding", 11, 13, pad, False),
        ("empty-row", 11, 13, rows, False),
        ("per-head", 11, 13, heads, True),
    ]


@pytest.mark.parametrize("case", _lowp_cases(), ids=lambda c: c[0])
def test_short_lowp_kernel_is_as_accurate_as_the_fused_kernel(case):
    """bfloat16 on the CPU at <= SHORT_LOWP_KEYS keys, through accel's float32-softmax kernel, against torch's
    fused kernel (decision 52). Both are compared with float64 attention on the same bfloat16-rounded
    inputs: ours must be within 1.25x the fused kernel's error (rms, values and gradients) and within
    bfloat16's resolution (2^-8 relative of values of about 1: 0.03 absolute at most)."""
    _, t, s, mask, causal = case
    g = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(2, H, n, 16, generator=g) for n in (t, s, s))
    q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
    w = torch.randn(2, H, t, 16, generator=g)

    def run(fn, *xs):
        out, _ = fn(*xs, mask, causal=causal)
        grads = torch.autograd.grad((out.double() * w).sum(), xs)
        return [out.detach().double(), *(x.double() for x in grads)]

    exact = run(math_attention, *(x.detach().double().requires_grad_() for x in (q, k, v)))
    ours = run(accel_attention.sdpa_lowp_cpu, q, k, v)
    fused = run(sdpa_attention, q, k, v)

    def rms(a, b):
        return float((a - b).pow(2).mean().sqrt())

    for name, o, f, e in zip(("out", "dq", "dk", "dv"), ours, fused, exact, strict=True):
        assert rms(o, e) <= 1.25 * rms(f, e) + 1e-4, (name, rms(o, e), rms(f, e))
        assert float((o - e).abs().max()) <= 0.03 * max(1.0, float(e.abs().max())), name
    if case[0] == "empty-row":
        assert torch.equal(ours[0][0, :, 4], torch.zeros_like(ours[0][0, :, 4]))


def test_short_lowp_kernel_only_where_it_is_faster(monkeypatch):
    """Past SHORT_LOWP_KEYS keys, and for float32, the accel backend is torch's fused kernel itself."""
    calls = []
    monkeypatch.setattr(accel_attention, "_short_lowp_cpu", lambda *a: calls.append(a) or a[0])
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    for n in (accel_attention.SHORT_LOWP_KEYS, accel_attention.SHORT_LOWP_KEYS + 1):
        k = torch.randn(1, 2, n, 8, dtype=torch.bfloat16)
        accel_attention.sdpa_lowp_cpu(q, k, k)
    accel_attention.sdpa_lowp_cpu(q.float(), q.float(), q.float())
    assert len(calls) == 1 and calls[0][1].shape[-2] == accel_attention.SHORT_LOWP_KEYS


def test_bf16_model_attention_goes_through_the_accel_kernel(monkeypatch):
    calls = []
    real = accel_attention._short_lowp_cpu
    monkeypatch.setattr(accel_attention, "_short_lowp_cpu", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(vocab_size=30, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=16))
    ids = torch.randint(30, (2, 9))
    lm = lm.to(torch.bfloat16).eval()
    with torch.no_grad():
        stock = lm(ids).logits
        assert calls == []
        fast = accel.apply(lm)(ids).logits
    assert len(calls) == 2  # one per layer
    torch.testing.assert_close(fast.float(), stock.float(), rtol=0.05, atol=0.05)
