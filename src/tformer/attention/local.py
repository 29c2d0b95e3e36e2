"""Sliding-window (local) attention: each query sees the keys within `window` positions of it
(Longformer's local pattern, Beltagy et al., 2020), or, causal, the `window` positions before it and itself.

Cost and memory are O(T * window) instead of O(T^2): queries are cut into blocks of `window`, and each
block attends only to the keys of its own and its two neighbouring blocks, gathered with `unfold`. The
result equals `math` with the band mask `band_mask` (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tformer.attention.masks import key_padding

DEFAULT_WINDOW = 256


def band_mask(t: int, s: int, window: int, *, causal: bool, device: torch.device | None = None) -> Tensor:
    """(T, S) bool: query i (absolute position i + S - T) may see key j when |i - j| <= window
    (causal: 0 <= i - j <= window)."""
    q = torch.arange(t, device=device)[:, None] + (s - t)
    k = torch.arange(s, device=device)[None, :]
    near = (q - k).abs() <= window
    return near & (k <= q) if causal else near


def reference_mask(
    t: int, s: int, *, causal: bool, device: torch.device | None = None, window: int = DEFAULT_WINDOW
) -> Tensor:
    """What `math` must also mask to compute this backend's attention (its weights, when asked for)."""
    return band_mask(t, s, window, causal=causal, device=device)


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    scale: float | None = None,
    window: int = DEFAULT_WINDOW,
) -> tuple[Tensor, Tensor | None]:
    if need_weights:
        raise ValueError(
            "the 'local' backend does not form the (T, S) attention matrix; use 'math' for weights"
        )
    if window < 1:
        raise ValueError(f"attention window must be >= 1, got {window}")
    b, h, t, d = q.shape
    s = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    padding = key_padding(mask, backend="local")
    keys_ok = None if padding is None else padding[:, 0, :, 0].expand(b, s)  # (B, S)
    if t != s:  # decoding with a cache (usually T = 1): the band is short, do it directly
        allowed = band_mask(t, s, window, causal=causal, device=q.device)
        if keys_ok is not None:
            allowed = allowed & keys_ok[:, None, None, :]
        from tformer.attention.backends import math_attention

        return math_attention(q, k, v, allowed, dropout_p=dropout_p, scale=scale)
    w = window
    nb = -(-t // w)  # query blocks
    pad_t = nb * w - t
    qb = F.pad(q, (0, 0, 0, pad_t)).view(b, h, nb, w, d)  # (B, H, nb, w, D)
    # keys padded by one block on each side, then 3-block windows that step one block at a time
    kp = F.pad(k, (0, 0, w, w + pad_t))
    vp = F.pad(v, (0, 0, w, w + pad_t))
    kw = kp.unfold(2, 3 * w, w).transpose(-2, -1)  # (B, H, nb, 3w, D)
    vw = vp.unfold(2, 3 * w, w).transpose(-2, -1)
    scores = torch.matmul(qb, kw.transpose(-2, -1)) * scale  # (B, H, nb, w, 3w)
    qpos = torch.arange(nb * w, device=q.device).view(nb, w, 1)  # absolute query positions
    kpos = (torch.arange(nb, device=q.device)[:, None] * w - w + torch.arange(3 * w, device=q.device)).view(
        nb, 1, 3 * w
    )
    allowed = ((qpos - kpos).abs() <= w) & (kpos >= 0) & (kpos < s)  # (nb, w, 3w)
    if causal:
        allowed = allowed & (kpos <= qpos)
    allowed = allowed[None, None]  # (1, 1, nb, w, 3w)
    if keys_ok is not None:
        kok = F.pad(keys_ok, (w, w + pad_t), value=False).unfold(1, 3 * w, w)  # (B, nb, 3w)
        allowed = allowed & kok[:, None, :, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    p = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        p = F.dropout(p, p=dropout_p)
    out = torch.matmul(p, vw).reshape(b, h, nb * w, v.shape[-1])[:, :, :t]  # (B, H, T, D_v)
    return out, None
