"""Exact attention in key blocks with an online softmax: memory linear in sequence length.

The forward pass walks the keys in blocks of `block_size`, keeping for each query the running maximum
score m, the running normaliser l = sum exp(score - m) and the running weighted sum of values, rescaled
whenever m grows (Milakov & Gimelshein, 2018; the forward of FlashAttention, Dao et al., 2022). Only the
output and each query's log-sum-exp are saved; the backward pass recomputes each block's probabilities from
them, so neither pass ever holds the (T, S) score matrix. Same results as `math` (to float rounding).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

DEFAULT_BLOCK = 256


def _block_mask(
    mask: Tensor | None, causal: bool, t: int, s: int, s0: int, s1: int, device: torch.device
) -> Tensor | None:
    """The (broadcastable) bool mask for keys [s0, s1), causal part included."""
    out = None
    if mask is not None:
        out = mask if mask.shape[-1] == 1 else mask[..., s0:s1]
    if causal:
        q = torch.arange(t, device=device)[:, None] + (s - t)  # absolute query positions
        k = torch.arange(s0, s1, device=device)[None, :]
        c = k <= q  # (T, block)
        out = c if out is None else out & c
    return out


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float, block: int
    ) -> Tensor:
        b, h, t, d = q.shape
        s = k.shape[-2]
        m = torch.full((*q.shape[:-1], 1), float("-inf"), dtype=q.dtype, device=q.device)  # (B, H, T, 1)
        l = torch.zeros_like(m)
        acc = q.new_zeros(*q.shape[:-1], v.shape[-1])  # (B, H, T, D_v); D_v != D for the "l2" score
        for s0 in range(0, s, block):
            s1 = min(s, s0 + block)
            scores = torch.matmul(q, k[..., s0:s1, :].transpose(-2, -1)) * scale  # (B, H, T, blk)
            allowed = _block_mask(mask, causal, t, s, s0, s1, q.device)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing yet
            p = torch.exp(scores - shift)
            correction = torch.exp(m - shift)
            l = l * correction + p.sum(-1, keepdim=True)
            acc = acc * correction + torch.matmul(p, v[..., s0:s1, :])
            m = m_new
        empty = l == 0  # queries with no key to attend to
        out = torch.where(empty, torch.zeros_like(acc), acc / torch.where(empty, torch.ones_like(l), l))
        lse = torch.where(empty, torch.full_like(m, float("inf")), m + torch.log(l))  # inf: p = 0 in backward
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        ctx.causal, ctx.scale, ctx.block, ctx.has_mask = causal, scale, block, mask is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        t, s = q.shape[-2], k.shape[-2]
        scale, block = ctx.scale, ctx.block
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, H, T, 1): rowsum(dO * O)
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for s0 in range(0, s, block):
            s1 = min(s, s0 + block)
            kb, vb = k[..., s0:s1, :], v[..., s0:s1, :]
            scores = torch.matmul(q, kb.transpose(-2, -1)) * scale
            allowed = _block_mask(mask, ctx.causal, t, s, s0, s1, q.device)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            p = torch.exp(scores - lse)  # (B, H, T, blk), the softmax probabilities of this block
            dv_b = torch.matmul(p.transpose(-2, -1), grad_out)
            dp = torch.matmul(grad_out, vb.transpose(-2, -1))
            ds = p * (dp - delta)
            dq += torch.matmul(ds, kb) * scale
            dk_b = torch.matmul(ds.transpose(-2, -1), q) * scale
            # k, v may be broadcast over batch or heads (shape 1 there): sum the gradient back down
            dk[..., s0:s1, :] += _reduce_to(dk_b, kb.shape)
            dv[..., s0:s1, :] += _reduce_to(dv_b, vb.shape)
        return dq, dk, dv, None, None, None, None


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    dims = [i for i, (g, want) in enumerate(zip(grad.shape, shape, strict=True)) if want == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> tuple[Tensor, Tensor | None]:
    """Exact softmax attention, keys in blocks of `block_size`; no (T, S) matrix is ever stored."""
    if need_weights:
        raise ValueError(
            "the 'chunked' backend never forms the attention matrix, so it cannot return weights; "
            "use the 'math' backend"
        )
    if dropout_p > 0.0:
        raise ValueError(
            "the 'chunked' backend does not support attention dropout; set attention_dropout = 0"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mask is not None and mask.dim() < 2:  # () or (S,): the blocks slice the last dim of (..., T|1, S)
        mask = mask.reshape(1, -1)
    return _ChunkedAttention.apply(q, k, v, mask, causal, scale, block_size), None
