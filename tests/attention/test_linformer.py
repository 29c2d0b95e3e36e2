"""Linformer: with identity projections it is exact attention; masks honoured; clear errors."""

import pytest
import torch

from tformer.attention import MultiHeadAttention, math_attention
from tformer.attention.linformer import linformer_attention


def _inputs(t=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, t, 4, generator=g, dtype=torch.float64) for _ in range(3)]


def test_identity_projection_is_exact_attention():
    q, k, v = _inputs()
    eye = torch.eye(6, 8, dtype=torch.float64)  # rank 6 >= S: E = F = identity on the 6 keys
    out, _ = linformer_attention(q, k, v, proj_k=eye, proj_v=eye)
    ref, _ = math_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_masked_key_cannot_change_the_output():
    q, k, v = _inputs()
    e = torch.randn(3, 8, dtype=torch.float64)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[:, ..., 4:] = False
    out, _ = linformer_attention(q, k, v, mask, proj_k=e, proj_v=e)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5] += 9.0
    v2[:, :, 5] -= 9.0
    out2, _ = linformer_attention(q, k2, v2, mask, proj_k=e, proj_v=e)
    torch.testing.assert_close(out, out2, atol=1e-12, rtol=0)


def test_module_owns_projections_and_refuses_causal():
    mha = MultiHeadAttention(8, 2, backend="linformer", backend_options={"rank": 4, "max_seq_len": 10})
    assert mha.proj_k.shape == (4, 10) and mha.proj_v.requires_grad
    x = torch.randn(2, 7, 8)
    out = mha(x).out
    assert out.shape == (2, 7, 8)
    out.sum().backward()
    assert mha.proj_k.grad is not None
    with pytest.raises(ValueError, match="cannot be causal"):
        mha(x, causal=True)
    with pytest.raises(ValueError, match="more than the Linformer projection's max_seq_len = 10"):
        mha(torch.randn(1, 11, 8))
