"""Token-level losses for sequence outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sequence_cross_entropy(
    logits: Tensor, targets: Tensor, *, pad_id: int, label_smoothing: float = 0.0
) -> Tensor:
    """Summed (label-smoothed) cross-entropy over non-padding targets. logits (B, T, V), targets (B, T).

    Smoothing follows torch's definition: the target distribution is (1 - eps) on the gold token plus eps
    spread uniformly over all V classes (section 5.4 of the paper uses eps = 0.1). Divide by the number of
    real tokens for the mean.
    """
    v = logits.shape[-1]
    return F.cross_entropy(
        logits.reshape(-1, v).float()
        if logits.dtype in (torch.float16, torch.bfloat16)
        else logits.reshape(-1, v),
        targets.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
