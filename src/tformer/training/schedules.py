"""Learning-rate schedules as multipliers of the peak rate, for torch.optim.lr_scheduler.LambdaLR."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def inverse_sqrt(warmup: int) -> Callable[[int], float]:
    """The paper's schedule (section 5.3) normalised to peak 1: linear warm-up, then 1/sqrt(step)."""
    w = max(1, warmup)

    def f(step: int) -> float:
        s = step + 1
        return min(s / w, math.sqrt(w / s))

    return f


def cosine(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then half a cosine down to `floor` at step `total`, flat after."""
    w = max(1, warmup)

    def f(step: int) -> float:
        s = step + 1
        if s < w:
            return s / w
        progress = min(1.0, (s - w) / max(1, total - w))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def constant(warmup: int) -> Callable[[int], float]:
    w = max(1, warmup)
    return lambda step: min(1.0, (step + 1) / w)


def peak_lr(lr: float | None, d_model: int, warmup: int) -> float:
    """The configured peak, or the paper's d_model**-0.5 * warmup**-0.5 (its value at the end of warm-up)."""
    return lr if lr is not None else d_model**-0.5 * max(1, warmup) ** -0.5


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    warmup: int,
    total: int | None = None,
    min_lr: float = 0.0,
    peak: float = 1.0,
) -> LambdaLR:
    if name == "inverse_sqrt":
        fn = inverse_sqrt(warmup)
    elif name == "cosine":
        if total is None:
            raise ValueError("the cosine schedule needs the total number of steps")
        fn = cosine(warmup, total, min_lr / peak)
    elif name == "constant":
        fn = constant(warmup)
    else:
        raise ValueError(f"unknown schedule {name!r}; expected inverse_sqrt, cosine or constant")
    return LambdaLR(optimizer, fn)
