"""A faster CPU kernel for short attention in training, registered as the attention backend
"sdpa_lowp_cpu" that `accel.apply` puts in the place of "sdpa".

Why: on the CPU, torch's fused `scaled_dot_product_attention` in bfloat16 / float16 was 1.4-1.9x slower
than three plain products with a float32 softmax at up to `SHORT_LOWP_KEYS` keys, at the same accuracy
(docs/decisions.md, decision 52), when training. In float32 the same products beat the fused kernel's
forward and backward at a few dozen keys on some CPUs (1.3-2.4x at 5-15 keys, even at 64, 0.6x at 512 on
an AVX2 AMD EPYC, family 25 model 1; decision 112), so there the model's plan chooses per key-length
class by timing (`Plan.attention_path`, up to `SHORT_FP32_KEYS` keys), and `backend(plan)` binds this
backend to the model's plan. Everything else (CUDA, longer sequences, calls without gradients, where the
fused kernel is faster: decision 75) is "sdpa" itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from tformer.attention.backends import Backend, full_mask, get_backend, register, sdpa_attention

if TYPE_CHECKING:
    from tformer.accel.plan import Plan

NAME = "sdpa_lowp_cpu"
_LOWP = (torch.bfloat16, torch.float16)
# Up to this many keys, bfloat16 attention on the CPU goes through `_short_lowp_cpu`: forward+backward of
# a causal (2, 12, T, 64) problem took 1.1 / 6.8 / 22.8 ms there against the fused kernel's 2.1 / 9.6 /
# 30.9 ms at T = 64 / 256 / 512, and lost from 1024 keys on (86 vs 69 ms) as the (T, S) scores outgrow
# the caches (docs/decisions.md, decision 52).
SHORT_LOWP_KEYS = 512
# float32 training calls of up to this many keys are timed per key-length class (`FP32_KEY_CLASSES`); past
# it the fused kernel stays (it won from 256 keys on the CPU of decision 112)
SHORT_FP32_KEYS = 128
FP32_KEY_CLASSES = (16, 32, 64, 128)  # a class: keys up to this (above the one before)


def key_class(keys: int) -> int:
    """The float32 key-length class of a call with `keys` keys (<= SHORT_FP32_KEYS)."""
    return next(c for c in FP32_KEY_CLASSES if keys <= c)


def _short_lowp_cpu(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float, scale: float | None
) -> Tensor:
    """Low-precision attention on the CPU for short sequences, computed as the fused kernel computes it:
    scores q k^T and their softmax in float32 (from the low-precision q and k, so the scores are not
    rounded), the weights rounded to q's dtype for the product with v. Its error against float64 equals
    the fused kernel's (tests/test_attention.py); fully masked rows give zeros."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    t, s = q.shape[-2], k.shape[-2]
    bias, empty = None, None  # an additive float32 mask of the mask's own (small, broadcast) shape
    if mask is None and causal and t > 1:  # the queries are the last t positions: every row has a key
        bias = torch.full((t, s), float("-inf"), device=q.device).triu_(s - t + 1)
    elif (allowed := full_mask(mask, causal, t, s, q.device)) is not None:
        # a row with no key to attend to attends everywhere (finite) and is zeroed at the end: no host sync
        empty = ~allowed.any(dim=-1, keepdim=True)
        bias = torch.zeros(allowed.shape, device=q.device).masked_fill_(~(allowed | empty), float("-inf"))
    # (B, H, ...) with a (T, S) bias or none: batched products over B*H, scale and bias in one pass
    flat = q.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2] and (bias is None or bias.dim() == 2)
    with torch.autocast("cpu", enabled=False):
        if flat:
            q_, k_, v_ = q.flatten(0, 1).float(), k.flatten(0, 1).float().transpose(1, 2), v.flatten(0, 1)
            if bias is None:
                scores = torch.bmm(q_, k_).mul_(scale)
            else:
                scores = torch.baddbmm(bias.expand(q_.shape[0], t, s), q_, k_, alpha=scale)
        else:
            q_, k_, v_ = q.float(), k.float().transpose(-2, -1), v
            scores = torch.matmul(q_, k_).mul_(scale)
            scores = scores if bias is None else scores.add_(bias)
        weights = torch.softmax(scores, dim=-1)  # (B[*H], [H,] T, S) float32
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = (torch.bmm if flat else torch.matmul)(weights.to(v.dtype), v_)
    out = out.view(*q.shape[:-1], v.shape[-1])  # (B, H, T, D)
    return out if empty is None else out.masked_fill(empty, 0.0)


@register(NAME, supports_weights=False)
def sdpa_lowp_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    scale: float | None = None,
    plan: Plan | None = None,
) -> tuple[Tensor, Tensor | None]:
    """ "sdpa", with bfloat16 / float16 CPU calls of up to `SHORT_LOWP_KEYS` keys that autograd records
    (training) through `_short_lowp_cpu`. Without gradients (decoding, evaluation) the fused kernel is
    faster: 5-9x at one query against 33-64 keys, 1.05-1.5x at 32 queries (Intel Xeon family 6 model 167,
    no_grad); with gradients `_short_lowp_cpu` was 1.16x faster at (2, 12, 256, 64) and 6-14x at the demo's
    and nanoGPT's shapes there (decision 75). float32 training calls of up to `SHORT_FP32_KEYS` keys take
    it where `plan` (the model's) chose "short" for their key-length class (decision 112)."""
    if (
        not need_weights
        and q.device.type == "cpu"
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        keys = k.shape[-2]
        if (q.dtype in _LOWP and keys <= SHORT_LOWP_KEYS) or (
            plan is not None
            and q.dtype == torch.float32 == k.dtype == v.dtype
            and keys <= SHORT_FP32_KEYS
            and not torch.compiler.is_compiling()
            and plan.attention_path(q, k, v, mask, causal, scale) == "short"
        ):
            return _short_lowp_cpu(q, k, v, mask, causal, dropout_p, scale), None
    return sdpa_attention(
        q, k, v, mask, causal=causal, dropout_p=dropout_p, need_weights=need_weights, scale=scale
    )


def backend(plan: Plan) -> Backend:
    """The "sdpa_lowp_cpu" backend whose float32 choices are `plan`'s (what `accel.apply` gives a model's
    attention layers): its function bound to the plan, so a copied model (copy.deepcopy) gets its copy's
    plan and a pickled one the plan's choices (Plan's own rules)."""
    return dataclasses.replace(get_backend(NAME), fn=functools.partial(sdpa_lowp_cpu, plan=plan))


__all__ = [
    "NAME",
    "SHORT_FP32_KEYS",
    "SHORT_LOWP_KEYS",
    "backend",
    "key_class",
    "sdpa_lowp_cpu",
]
