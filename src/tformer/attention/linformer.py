"""Linformer attention (Wang et al., 2020): keys and values are projected along the sequence to a fixed
rank k by learned (k, max_seq_len) matrices E and F, so attention costs O(T * k) instead of O(T * S).

softmax(Q (E K)^T / sqrt(D)) (F V). Padding keys are zeroed before the projection. It mixes all positions
into each projected key, so it cannot be causal; and it has no (T, S) weights to return.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tformer.attention.masks import key_padding


def linformer_parameters(
    n_heads: int, d_head: int, *, rank: int = 64, max_seq_len: int = 512
) -> dict[str, nn.Parameter]:
    """The learned sequence projections E ("proj_k") and F ("proj_v"), (rank, max_seq_len) each, shared by
    the heads of one attention layer; their names are the kernel's keywords and the state-dict keys."""
    rank, max_seq_len = int(rank), int(max_seq_len)
    return {
        "proj_k": nn.Parameter(torch.randn(rank, max_seq_len) / math.sqrt(max_seq_len)),
        "proj_v": nn.Parameter(torch.randn(rank, max_seq_len) / math.sqrt(max_seq_len)),
    }


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    scale: float | None = None,
    proj_k: Tensor | None = None,
    proj_v: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    if causal:
        raise ValueError(
            "the 'linformer' backend mixes all positions into each projected key, so it cannot be "
            "causal; use it in encoders (classifier, translation encoder) or pick another backend"
        )
    if need_weights:
        raise ValueError("the 'linformer' backend has no (T, S) attention weights; use 'math' for them")
    if proj_k is None or proj_v is None:
        raise ValueError(
            "the 'linformer' backend needs its projections (linformer_parameters; MultiHeadAttention owns them)"
        )
    s = k.shape[-2]
    if s > proj_k.shape[-1]:
        raise ValueError(f"{s} keys, more than the Linformer projection's max_seq_len = {proj_k.shape[-1]}")
    keep = key_padding(mask, backend="linformer")  # (B, 1, S, 1)
    if keep is not None:
        k, v = k * keep.to(k.dtype), v * keep.to(v.dtype)
    e, f = proj_k[:, :s].to(k.dtype), proj_v[:, :s].to(v.dtype)  # (rank, S)
    k_low = torch.matmul(e, k)  # (B, H, rank, D)
    v_low = torch.matmul(f, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    weights = torch.softmax(torch.matmul(q, k_low.transpose(-2, -1)) * scale, dim=-1)  # (B, H, T, rank)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v_low), None
