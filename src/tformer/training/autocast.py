"""The training step's precision: which combinations run (check_precision), the autocast context of the
forward pass, and the confirmation of precision "auto"'s bf16 on the model's own step (accel/precision.py
chooses; this times the step it is asked about)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def scratch_steps(model: torch.nn.Module) -> Iterator[None]:
    """Trial forward and backward passes inside leave no trace: the gradients are cleared (before and after) and
    the buffers (batch-norm statistics) restored, so training starts as if they had not run (each trial
    forks the random streams itself, `trial_step`)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.zero_grad(set_to_none=True)  # the trials' own gradients, not added to a step's
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def trial_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor], precision: str) -> None:
    """One forward (`loss()`, a summed loss) and backward of `model` on the CPU under `precision`, the
    random streams forked; the gradients cleared after (inside `scratch_steps`)."""
    with torch.random.fork_rng(devices=[]):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            total = loss()
        total.backward()
    model.zero_grad(set_to_none=True)


def confirm_on_step(
    model: torch.nn.Module,
    loss: Callable[[], torch.Tensor],
    confirm: Callable[[Key, Callable[[str], object]], tuple[str, str]],
) -> tuple[str, str]:
    """`confirm(key, step)` (accel.precision.confirm_by_step) with `step(precision)` one `trial_step` of
    the model under that precision, inside `scratch_steps`. -> (precision, why)."""
    n_params = sum(p.numel() for p in model.parameters())
    with scratch_steps(model):
        return confirm((type(model).__name__, n_params), lambda precision: trial_step(model, loss, precision))
