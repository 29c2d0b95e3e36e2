"""Dropout with a cheaper random mask on the CPU: the "bits16" path of `AccelDropout`.

Why: torch's CPU dropout draws one Bernoulli variate per element (`bernoulli_`, serial on the generator):
on an Intel Xeon (family 6 model 167, 2 threads) 5 ms for one (3000, 128) activation, and
`tformer demo`'s 3+3 layers drop out 23 of them a step: a third of its training time, more than all its
products. "bits16" draws one 64-bit word of the same generator per four elements (`random_` on int64)
and keeps an element where its 16-bit lane falls below k - 2^15, k = round((1 - p) 2^16): each element is
kept independently with probability k / 2^16 (p = 0.1: 0.899994 for 0.9) and scaled by 2^16 / k, so that
E[dropout(x)] = x exactly, as with torch's 1 / (1 - p). Forward and backward together 2-2.6x faster than
`F.dropout` there from 384k elements; slower below about 10k (the extra ops' fixed cost), so tensors
under `MIN_NUMEL` elements always take F.dropout.

The masks are not torch's, draw for draw (another use of the same generator): so the path is chosen
per dtype by timing on first use like the linear layers' classes (accel/plan.py: stock unless "bits16"
beat it by more than the noise, timed with the caller's random stream restored), and the choice is
recorded with the run, so a resumed run draws its masks as it began.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LANES = 4  # 16-bit lanes per 64-bit random word
_LEVELS = 1 << 16
_LOW, _HIGH = -(1 << 63), (1 << 63) - 1  # random_'s range: every 64-bit word but one
# Below this many elements dropout is stock whatever was chosen: "bits16"'s extra ops cost more than its
# draws save there (0.8-0.9x at 4096 elements, 2.6x at 384k on the Xeon of the module's doc)
MIN_NUMEL = 1 << 14
TIMED_NUMEL = 1 << 20  # the choice per dtype is timed at this many elements (plan.py)


def keep_levels(p: float) -> int:
    """k: an element is kept with probability k / 2^16 (the nearest to 1 - p)."""
    return round((1.0 - p) * _LEVELS)


def supported(x: Tensor, p: float) -> bool:
    """Whether "bits16" is a candidate for dropout(x, p): on the CPU, at least `MIN_NUMEL` elements,
    0 < k < 2^16, floating x, outside torch.compile (which traces F.dropout)."""
    return (
        x.device.type == "cpu"
        and x.numel() >= MIN_NUMEL
        and x.is_floating_point()
        and 0 < keep_levels(p) < _LEVELS
        and not torch.compiler.is_compiling()
    )


def bits16_dropout(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """dropout(x, p) in training mode with the "bits16" mask (see the module's doc); differentiable.
    The caller checked `supported(x, p)`."""
    k = keep_levels(p)
    n = x.numel()
    words = torch.empty((n + _LANES - 1) // _LANES, dtype=torch.int64, device=x.device)
    words.random_(_LOW, _HIGH, generator=generator)
    keep = words.view(torch.int16)[:n].view(x.shape) < k - (_LEVELS >> 1)
    return (x * keep).mul_(_LEVELS / k)


class AccelDropout(nn.Dropout):
    """nn.Dropout whose training-mode CPU masks take the path its model's plan chose for their class
    (`_accel_plan`; "stock": F.dropout). `accel.apply` changes an `nn.Dropout`'s class to this one and
    `accel.revert` changes it back; it has no parameters or buffers."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.inplace or not supported(x, self.p):
            return F.dropout(x, self.p, self.training, self.inplace)
        plan = self.__dict__.get("_accel_plan")
        if plan is None or plan.dropout_path(x, self.p) == "stock":
            return F.dropout(x, self.p, True)
        return bits16_dropout(x, self.p)


__all__ = ["AccelDropout", "bits16_dropout", "keep_levels", "supported"]
