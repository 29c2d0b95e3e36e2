"""Attention masks. ONE convention for the whole package: boolean, True = may attend.

Masks broadcast to (B, H, T, S): a padding mask is (B, 1, 1, S), a causal mask (T, S). Only the attention
backends turn a mask into additive -inf / large negative scores. `torch.nn.MultiheadAttention` uses the
opposite polarity (True = ignore); convert at that boundary with `~mask`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(B, S) ids -> (B, 1, 1, S) bool, True where the key is a real token."""
    return (ids != pad_id)[:, None, None, :]


def lengths_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, 1, 1, S) bool, True for the first `lengths[b]` keys."""
    positions = torch.arange(max_len, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, None, :]


def causal_mask(t: int, s: int | None = None, *, device: torch.device | None = None) -> Tensor:
    """(T, S) bool, True where query i may see key j: j <= i + (S - T).

    With S > T (decoding with a cache of S - T earlier keys) the queries are the last T positions.
    """
    s = t if s is None else s
    q = torch.arange(t, device=device)[:, None] + (s - t)
    k = torch.arange(s, device=device)[None, :]
    return k <= q


def positions_mask(positions: Tensor, s: int) -> Tensor:
    """(B, T) each query's position -> (B, 1, T, S) bool, True where key slot j <= the query's position:
    causality for a batch whose rows sit at different positions of one KV cache (slot = position)."""
    keys = torch.arange(s, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


def combine(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of the given masks (None = attend everywhere), broadcast together."""
    out: Tensor | None = None
    for mask in masks:
        if mask is None:
            continue
        out = mask if out is None else out & mask
    return out


def check_mask(mask: Tensor, *, b: int, t: int, s: int, name: str = "mask") -> None:
    """Raise a clear error unless `mask` is bool and broadcasts to (B, H, T, S)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must have dtype torch.bool (True = may attend), got {mask.dtype}; "
            "convert an additive float mask with `mask == 0`"
        )
    if mask.dim() > 4:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}; expected at most 4 dims broadcastable to (B, H, T, S)"
        )
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    for got, want, letter in zip(shape, (b, None, t, s), "BHTS", strict=True):
        if want is not None and got not in (1, want):
            raise ValueError(
                f"{name} has shape {tuple(mask.shape)}, which does not broadcast to "
                f"(B={b}, H, T={t}, S={s}): dimension {letter} is {got}"
            )


def key_padding(mask: Tensor | None, *, backend: str) -> Tensor | None:
    """For backends that never form the (T, S) matrix: accept only masks that depend on the key alone,
    shaped (B|1, 1, 1, S) (or fewer leading dims), and return them as (B|1, 1, S, 1) to scale keys by."""
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m.shape[1] != 1 or m.shape[2] != 1:
        raise ValueError(
            f"the {backend!r} backend takes key-padding masks of shape (B, 1, 1, S), got {tuple(mask.shape)}; "
            "use 'math' for general masks"
        )
    return m[:, :, 0, :, None]
