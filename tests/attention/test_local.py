"""Sliding-window attention equals `math` with the band mask; it never looks past its window."""

import pytest
import torch

from tformer.attention import math_attention
from tformer.attention.local import band_mask, local_attention


def _inputs(t, s, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, n, 8, generator=g, dtype=dtype, requires_grad=True) for n in (t, s, s)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, window", [(13, 4), (16, 4), (5, 8), (9, 1)])
def test_equals_math_with_band_mask(causal, t, window):
    q, k, v = _inputs(t, t)
    pad = torch.ones(2, 1, 1, t, dtype=torch.bool)
    pad[1, ..., t - 2 :] = False
    ref, _ = math_attention(q, k, v, band_mask(t, t, window, causal=causal) & pad)
    out, _ = local_attention(q, k, v, pad, causal=causal, window=window)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_decoding_step_sees_only_the_window():
    q, k, v = _inputs(1, 10)
    out, _ = local_attention(q, k, v, causal=True, window=3)
    ref, _ = math_attention(q, k[:, :, 6:], v[:, :, 6:])  # the last query sees positions 6..9
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_a_key_outside_the_window_cannot_change_the_output():
    q, k, v = _inputs(12, 12)
    out, _ = local_attention(q, k, v, window=2)
    v2 = v.detach().clone()
    v2[:, :, 11] += 100.0  # only queries 9..11 see key 11
    out2, _ = local_attention(q, k, v2, window=2)
    assert torch.equal(out[:, :, :9], out2[:, :, :9])
    assert not torch.equal(out[:, :, 9:], out2[:, :, 9:])


def test_general_masks_are_refused_with_a_clear_error():
    q, k, v = _inputs(4, 4)
    with pytest.raises(ValueError, match=r"key-padding masks of shape \(B, 1, 1, S\)"):
        local_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool), window=2)


def test_lm_with_local_attention_and_cache():
    from tformer.config import LMConfig
    from tformer.inference.sampling import generate
    from tformer.models import LanguageModel

    torch.manual_seed(0)
    c = LMConfig(
        vocab_size=30, d_model=16, n_heads=2, d_ff=32, n_layers=2, attention="local", attention_window=4
    )
    model = LanguageModel(c).double().eval()
    prompt = torch.randint(0, 30, (1, 5))
    a = generate(model, prompt, max_new_tokens=20, greedy=True, use_cache=True)
    b = generate(model, prompt, max_new_tokens=20, greedy=True, use_cache=False)
    assert torch.equal(a, b)
