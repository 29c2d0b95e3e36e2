"""The training step's precision: which combinations run (check_precision), the autocast context of the
forward pass, and the confirmation of precision "auto"'s bf16 on the model's own step (accel/precision.py
chooses; this times the step it is asked about)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tformer.accel.tune import Key
from tformer.config import ConfigError, TrainConfig
from tformer.training import distributed


def check_precision(config: TrainConfig, world: distributed.World) -> None:
    device, precision = world.device, config.precision
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision = 'fp16' needs a CUDA GPU (float16 autocast with a gradient scaler); this run "
            f"is on {device.type}: use 'bf16' (bfloat16 autocast) or 'fp32' there"
        )
    if precision == "fp16" and world.distributed and config.parallel == "fsdp":
        raise ConfigError(
            "train.precision = 'fp16' with train.parallel = 'fsdp' is not supported (each rank would see "
            "only its shard's overflows); use 'bf16', or 'ddp'"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.precision = 'bf16': {torch.cuda.get_device_name(device)} has no bfloat16; use 'fp16'"
        )


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """bfloat16 / float16 autocast for the forward pass when `precision` asks (weights and optimiser
    stay float32); a disabled context for fp32."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision != "fp32")


def confirm_on_step(
    model: torch.nn.Module,
    loss: Callable[[], torch.Tensor],
    confirm: Callable[[Key, Callable[[str], object]], tuple[str, str]],
) -> tuple[str, str]:
    """`confirm(key, step)` (accel.precision.confirm_by_step) with `step(precision)` one forward (`loss()`, a summed loss) and backward of
    the model on the CPU under that precision, the random streams forked; afterwards the gradients are
    cleared and the buffers (batch-norm statistics) restored, so training starts as if it had not run.
    -> (precision, why)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def step(precision: str) -> None:
        with torch.random.fork_rng(devices=[]):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                total = loss()
            total.backward()
        model.zero_grad(set_to_none=True)

    n_params = sum(p.numel() for p in model.parameters())
    try:
        return confirm((type(model).__name__, n_params), step)
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
