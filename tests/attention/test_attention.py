"""Attention against torch.nn.MultiheadAttention (float64, 1e-10) and backends against each other."""

import pytest
import torch

from support.weights import copy_mha, in_proj_grads
from tformer.attention import (
    MultiHeadAttention,
    causal_mask,
    combine,
    get_backend,
    lengths_mask,
    math_attention,
    padding_mask,
    sdpa_attention,
)

B, T, S, C, H = 3, 5, 7, 16, 4


def _pair(backend="math", cross=False):
    ours = MultiHeadAttention(C, H, backend=backend, cross=cross).double()
    ref = torch.nn.MultiheadAttention(C, H, batch_first=True).double()
    copy_mha(ours, ref)
    return ours, ref


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _compare(ours, ref, x, memory, our_mask, ref_kwargs, causal=False):
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    m1 = None if memory is None else memory.clone().requires_grad_()
    m2 = None if memory is None else memory.clone().requires_grad_()
    out = ours(x1, m1, mask=our_mask, causal=causal, need_weights=True)
    kv2 = x2 if m2 is None else m2
    ref_out, ref_w = ref(x2, kv2, kv2, need_weights=True, average_attn_weights=False, **ref_kwargs)
    torch.testing.assert_close(out.out, ref_out, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.weights, ref_w, atol=1e-10, rtol=0)
    g = torch.randn_like(ref_out)
    (out.out * g).sum().backward()
    (ref_out * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=0)
    if memory is not None:
        torch.testing.assert_close(m1.grad, m2.grad, atol=1e-10, rtol=0)
    ours_g, ref_g = _grads(ours), _grads(ref)
    in_w, in_b = in_proj_grads(ours)
    torch.testing.assert_close(in_w, ref_g["in_proj_weight"], atol=1e-10, rtol=0)
    torch.testing.assert_close(in_b, ref_g["in_proj_bias"], atol=1e-10, rtol=0)
    torch.testing.assert_close(ours_g["out_proj.weight"], ref_g["out_proj.weight"], atol=1e-10, rtol=0)
    torch.testing.assert_close(ours_g["out_proj.bias"], ref_g["out_proj.bias"], atol=1e-10, rtol=0)


def test_self_attention_key_padding_matches_torch():
    ours, ref = _pair()
    x = torch.randn(B, T, C, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 1])
    keep = lengths_mask(lengths, T)  # (B, 1, 1, T), True = attend
    # torch's key_padding_mask is the opposite polarity: True = ignore.
    _compare(ours, ref, x, None, keep, {"key_padding_mask": ~keep[:, 0, 0, :]})


def test_self_attention_causal_matches_torch():
    ours, ref = _pair()
    x = torch.randn(B, T, C, dtype=torch.float64)
    ref_mask = ~causal_mask(T)  # torch: True = not allowed
    _compare(ours, ref, x, None, None, {"attn_mask": ref_mask}, causal=True)
    # The same causal mask given explicitly instead of through the flag.
    ours.zero_grad()
    ref.zero_grad()
    _compare(ours, ref, x, None, causal_mask(T), {"attn_mask": ref_mask})


def test_cross_attention_with_padding_matches_torch():
    ours, ref = _pair(cross=True)
    x = torch.randn(B, T, C, dtype=torch.float64)
    memory = torch.randn(B, S, C, dtype=torch.float64)
    ids = torch.tensor([[4, 5, 6, 7, 8, 9, 1], [4, 5, 6, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0]])
    keep = padding_mask(ids, pad_id=0)
    _compare(ours, ref, x, memory, keep, {"key_padding_mask": ~keep[:, 0, 0, :]})


@pytest.mark.parametrize("causal", [False, True])
def test_math_and_sdpa_agree_float32_including_empty_rows(causal):
    q = torch.randn(B, H, T, 8, requires_grad=True)
    k = torch.randn(B, H, T, 8, requires_grad=True)
    v = torch.randn(B, H, T, 8, requires_grad=True)
    mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    mask[0, 0, 2, :] = False  # a query row that may attend to nothing
    mask[1, :, :, 3:] = False  # padding
    outs, grads = [], []
    for fn in (math_attention, sdpa_attention):
        out, _ = fn(q, k, v, mask, causal=causal)
        (g,) = torch.autograd.grad(out.sum() + (out**2).sum(), [q])
        outs.append(out)
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    for out, g in zip(outs, grads, strict=True):
        assert torch.isfinite(out).all() and torch.isfinite(g).all()
        assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))


def test_sdpa_causal_fast_path_and_offset_causal_agree():
    q = torch.randn(2, H, 6, 8)
    k = torch.randn(2, H, 6, 8)
    v = torch.randn(2, H, 6, 8)
    full, _ = sdpa_attention(q, k, v, causal=True)
    ref, _ = math_attention(q, k, v, causal=True)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    # The last 2 queries against all 6 keys (decoding with a cache): rows equal the full pass's.
    for fn in (math_attention, sdpa_attention):
        tail, _ = fn(q[:, :, 4:], k, v, causal=True)
        torch.testing.assert_close(tail, ref[:, :, 4:], atol=1e-5, rtol=1e-5)


def test_masks_convention_and_combination():
    ids = torch.tensor([[3, 4, 0]])
    assert padding_mask(ids, 0).tolist() == [[[[True, True, False]]]]
    assert causal_mask(2, 3).tolist() == [[True, True, False], [True, True, True]]
    both = combine(padding_mask(ids, 0), causal_mask(3))
    assert both.shape == (1, 1, 3, 3)
    assert both[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    assert combine(None, None) is None


def test_backend_without_weights_falls_back_with_warning():
    mha = MultiHeadAttention(C, H, backend="sdpa")
    x = torch.randn(2, 3, C)
    with pytest.warns(UserWarning, match="cannot return weights"):
        out = mha(x, need_weights=True)
    assert out.weights.shape == (2, H, 3, 3)
    with pytest.raises(ValueError, match="cannot return attention weights"):
        sdpa_attention(x.view(2, 1, 3, C), x.view(2, 1, 3, C), x.view(2, 1, 3, C), need_weights=True)
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'.*math"):
        get_backend("flash3")


def test_kv_cache_extends_keys():
    mha = MultiHeadAttention(C, H, backend="math").eval()
    x = torch.randn(2, 4, C)
    full = mha(x, causal=True)
    past = None
    steps = []
    for t in range(4):
        o = mha(x[:, t : t + 1], causal=True, past=past)
        past = o.kv
        steps.append(o.out)
    assert past.k.shape == (2, H, 4, C // H)
    torch.testing.assert_close(torch.cat(steps, 1), full.out, atol=1e-6, rtol=1e-6)
