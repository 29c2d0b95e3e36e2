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
    """Linear warm-up to 1, then half a cosine down to `floor` at step `total`, flat after.

    `total` None: a time budget (train.max_time) whose length in steps is measured (`size`): the rate holds
    at its peak until the warm-up has shown the step rate, then the decay runs to the step where the time is
    predicted to run out. Machines change speed as they warm up (allocators, caches, neighbours), so the
    prediction is made again at `RESIZE_AT` of the decay's progress from the rate since the last one; a new
    length keeps the progress reached and spreads the rest over the steps left, so the rate stays
    continuous (and a prediction that did not change leaves the curve as it was).

    A callable object rather than a closure: LambdaLR's state_dict keeps its attributes, so a resumed run
    decays over the length it measured before the stop."""

    RESIZE_AT = (0.5, 0.75, 0.9)  # fractions of the decay at which a time budget's length is measured again

    def __init__(self, warmup: int, total: int | None, floor: float) -> None:
        self.warmup = max(1, warmup)
        self.total, self.floor = total, floor
        # lists, not tuples: the attributes go through the checkpoint's JSON as they are
        self.segment: list[float] = [self.warmup, 0.0]  # [step, progress there]: linear in steps from it
        self.mark: list[float] | None = None  # budget: [steps, training seconds] at the last sizing
        self.resized = 0  # budget: how many of RESIZE_AT have been passed

    def progress(self, s: int) -> float:
        """The decay's progress (0 at its start, 1 at `total`) at step number `s` (1-based)."""
        if self.total is None:
            return 0.0
        start, p0 = self.segment
        return min(1.0, p0 + (1.0 - p0) * max(0, s - start) / max(1, self.total - start))

    def __call__(self, step: int) -> float:
        s = step + 1
        if s < self.warmup:
            return s / self.warmup
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * self.progress(s)))

    def size(self, done: int, seconds: float, budget: float) -> bool:
        """Measure the length against the time budget after `done` steps and `seconds` of training: at the
        first call once the warm-up is over (the rate so far), then at each RESIZE_AT (the rate since the
        last sizing). -> whether the length was (re)measured."""
        if self.mark is None:
            if self.total is not None or done < self.warmup:
                return False
            rate = done / max(seconds, 1e-9)
        else:
            if self.resized >= len(self.RESIZE_AT) or self.progress(done) < self.RESIZE_AT[self.resized]:
                return False
            self.resized += 1
            rate = (done - self.mark[0]) / max(seconds - self.mark[1], 1e-9)
        total = max(done + 1, done + round(rate * max(0.0, budget - seconds)))
        # keep the progress reached (0 at the first sizing); the rest over the steps predicted
        self.segment = [done, self.progress(done)]
        self.total, self.mark = total, [done, seconds]
        return True


def cosine(warmup: int, total: int, floor: float) -> Cosine:
    """Linear warm-up to 1, then half a cosine down to `floor` at step `total`, flat after."""
    return Cosine(warmup, total, floor)


def budget_cosine(scheduler: LambdaLR) -> Cosine | None:
    """The scheduler's cosine when its length comes from a time budget (made without a total), else None."""
    fn = scheduler.lr_lambdas[0]
    return fn if isinstance(fn, Cosine) and (fn.total is None or fn.mark is not None) else None


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
