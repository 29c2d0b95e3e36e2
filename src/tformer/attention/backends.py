"""Attention kernels behind one signature, and the registry that imports each by name (tformer/backends.py
declares the backends, what they can do and where their kernels live).

Every backend is `fn(q, k, v, mask=None, *, causal=False, dropout_p=0.0, need_weights=False, scale=None)`
with q (B, H, T, D), k and v (B, H, S, D), a bool mask broadcastable to (B, H, T, S) (True = may attend),
and returns (output (B, H, T, D), weights (B, H, T, S) or None). `causal` aligns the queries with the last
T keys, so a decoding step with a cache of earlier keys stays causal. A query row with nothing to attend
to yields zeros, never NaN.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tformer import backends as capabilities
from tformer.attention.masks import causal_mask, combine

AttentionFn = Callable[..., tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class Backend:
    """A kernel and its capabilities (`spec`, declared in tformer/backends.py)."""

    name: str
    fn: AttentionFn
    spec: capabilities.Backend

    @property
    def supports_weights(self) -> bool:
        return self.spec.weights

    @property
    def options(self) -> tuple[str, ...]:
        return self.spec.options


_REGISTRY: dict[str, Backend] = {}  # kernels imported so far, and those registered at run time


def load(path: str) -> Callable[..., Any]:
    """The function a "module:function" path of tformer/backends.py names."""
    module, _, symbol = path.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), symbol)
    return fn


def register(
    name: str, *, supports_weights: bool, options: tuple[str, ...] = ()
) -> Callable[[AttentionFn], AttentionFn]:
    """Register `fn` as the kernel `name` at run time (tformer.accel's machine-specific stand-ins for an
    exact kernel: capabilities of an exact kernel). A backend users choose is an entry of
    tformer/backends.py instead."""

    def wrap(fn: AttentionFn) -> AttentionFn:
        spec = capabilities.Backend(
            name,
            f"{fn.__module__}:{fn.__name__}",
            weights=supports_weights,
            scores=capabilities.EXACT,
            options=options,
        )
        _REGISTRY[name] = Backend(name, fn, spec)
        return fn

    return wrap


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        if name not in capabilities.BACKENDS:
            raise ValueError(
                f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
            )
        spec = capabilities.BACKENDS[name]
        _REGISTRY[name] = Backend(name, load(spec.kernel), spec)
    return _REGISTRY[name]


def available_backends() -> list[str]:
    return sorted({*capabilities.BACKENDS, *_REGISTRY})


def full_mask(mask: Tensor | None, causal: bool, t: int, s: int, device: torch.device) -> Tensor | None:
    if mask is not None and mask.dim() < 2:  # () or (S,): torch's fused kernel needs (..., T|1, S)
        mask = mask.reshape(1, -1)
    if causal and t > 1:  # a single query is the newest position: causality masks nothing
        return combine(mask, causal_mask(t, s, device=device))
    return mask


def math_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(D)) v, written out (paper eq. 1). The reference every backend is tested against."""
    t, s = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, S)
    allowed = full_mask(mask, causal, t, s, q.device)
    if allowed is not None:
        # The most negative finite value, not -inf: a fully masked row then gives a uniform (finite)
        # softmax that we zero below, so neither the output nor its gradient ever sees NaN.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    if allowed is not None:
        weights = weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = torch.matmul(weights, v)  # (B, H, T, D)
    return out, (weights if need_weights else None)


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """torch's fused `scaled_dot_product_attention` (flash / memory-efficient kernels where available).
    (`tformer.accel` may route short low-precision CPU calls to a faster kernel of its own.)"""
    if need_weights:
        raise ValueError("the 'sdpa' backend cannot return attention weights; use the 'math' backend")
    t, s = q.shape[-2], k.shape[-2]
    if mask is None and causal and t == s:
        # The kernel's own causal fast path (top-left aligned, which equals ours when T == S).
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        return out, None
    allowed = full_mask(mask, causal, t, s, q.device)
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale), None
    # Rows with no key to attend to would be NaN inside the kernel: let them attend everywhere (finite),
    # then zero their output.
    empty = ~allowed.any(dim=-1, keepdim=True)  # (B?, H?, T, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(empty, 0.0), None
