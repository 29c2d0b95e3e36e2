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


class Cosine:
    """Linear warm-up to 1, then half a cosine from 1 at step `start` (the warm-up's end unless later) down
    to `floor` at step `total`, flat after. `total` None: the decay's length is not known yet (a time
    budget, sized once the warm-up has measured the step rate: `size`), and the rate holds at its peak.

    A callable object rather than a closure: LambdaLR's state_dict keeps its attributes (`total`, `start`),
    so a resumed run decays over the length it sized before the stop."""

    def __init__(self, warmup: int, total: int | None, floor: float) -> None:
        self.warmup = max(1, warmup)
        self.total, self.floor = total, floor
        self.start = self.warmup

    def __call__(self, step: int) -> float:
        s = step + 1
        if s < self.warmup:
            return s / self.warmup
        if self.total is None:
            return 1.0
        progress = min(1.0, max(0, s - self.start) / max(1, self.total - self.start))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def size(self, done: int, total: int) -> None:
        """Decay from step `done` (the steps taken so far; the rate is at its peak there) to `total`."""
        self.start, self.total = max(self.warmup, done), max(done + 1, total)


def cosine(warmup: int, total: int, floor: float) -> Cosine:
    """Linear warm-up to 1, then half a cosine down to `floor` at step `total`, flat after."""
    return Cosine(warmup, total, floor)


def unsized_cosine(scheduler: LambdaLR) -> Cosine | None:
    """The scheduler's cosine when its length is still to be sized from a time budget, else None."""
    fn = scheduler.lr_lambdas[0]
    return fn if isinstance(fn, Cosine) and fn.total is None else None


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
    elif name == "cosine":  # total None: sized later from a time budget (Cosine.size)
        fn = Cosine(warmup, total, min_lr / peak)
    elif name == "constant":
        fn = constant(warmup)
    else:
        raise ValueError(f"unknown schedule {name!r}; expected inverse_sqrt, cosine or constant")
    return LambdaLR(optimizer, fn)
