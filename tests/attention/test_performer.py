"""Performer (FAVOR+): converges to softmax attention as features grow; masks honoured; causal never looks
ahead; the chunked prefix sums equal the one-shot causal computation."""

import pytest
import torch

from tformer.attention import math_attention
from tformer.attention.performer import performer_attention


def _inputs(t=32, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.5 * torch.randn(2, 2, t, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_estimate_converges_to_softmax_attention(causal):
    q, k, v = _inputs()
    ref, _ = math_attention(q, k, v, causal=causal)
    errors = []
    for m in (16, 256, 4096):
        out, _ = performer_attention(q, k, v, causal=causal, n_features=m)
        errors.append((out - ref).abs().mean().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.02, errors


def test_masked_key_cannot_change_the_output():
    q, k, v = _inputs()
    mask = torch.ones(2, 1, 1, 32, dtype=torch.bool)
    mask[:, ..., 20:] = False
    out, _ = performer_attention(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25] += 5.0
    v2[:, :, 25] -= 7.0
    out2, _ = performer_attention(q, k2, v2, mask)
    torch.testing.assert_close(out, out2, atol=1e-12, rtol=0)


def test_causal_never_looks_ahead_and_chunks_agree():
    q, k, v = _inputs(t=40)
    out, _ = performer_attention(q, k, v, causal=True, chunk=7)
    whole, _ = performer_attention(q, k, v, causal=True, chunk=40)
    torch.testing.assert_close(out, whole, atol=1e-10, rtol=0)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 30:] += 3.0
    v2[:, :, 30:] += 3.0
    out2, _ = performer_attention(q, k2, v2, causal=True, chunk=7)
    torch.testing.assert_close(out[:, :, :30], out2[:, :, :30], atol=1e-12, rtol=0)


def test_clear_errors():
    q, k, v = _inputs(t=4)
    with pytest.raises(ValueError, match="never forms attention weights"):
        performer_attention(q, k, v, need_weights=True)
    with pytest.raises(ValueError, match=r"key-padding masks of shape \(B, 1, 1, S\)"):
        performer_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool))


def test_cached_decoding_equals_the_full_causal_pass():
    from tformer.config import LMConfig
    from tformer.inference.sampling import generate
    from tformer.models import LanguageModel

    torch.manual_seed(0)
    c = LMConfig(vocab_size=30, d_model=16, n_heads=2, d_ff=32, n_layers=2, attention="performer")
    model = LanguageModel(c).double().eval()
    ids = torch.randint(0, 30, (2, 12))
    full = model(ids).logits
    first = model(ids[:, :5], use_cache=True)
    steps = [first.logits]
    cache = first.cache
    for t in range(5, 12):
        o = model(ids[:, t : t + 1], cache=cache)
        cache, steps = o.cache, [*steps, o.logits]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-9, rtol=0)
    a = generate(model, ids[:, :4], max_new_tokens=10, greedy=True, use_cache=True)
    b = generate(model, ids[:, :4], max_new_tokens=10, greedy=True, use_cache=False)
    assert torch.equal(a, b)
