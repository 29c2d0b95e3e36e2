"""One optimiser step's mechanics, apart from the loop: the optimiser, gradient scaling and clipping, the
non-finite check and the update that skips on the device.

Nothing non-finite reaches a checkpoint: every step checks its gradient norm on the device (no host sync:
the fused optimiser skips its own update when the flag is set, and the host reads the flag one step
later, while the next step's work is already queued). A skipped step consumes its batches but does not
advance the step counter or the schedule; after `max_nonfinite_skips` of them training stops with an
error. float16's GradScaler overflow skips are its own.
"""

from __future__ import annotations

import torch

from tformer.config import TrainConfig


class SkippingAdamW(torch.optim.AdamW):
    """AdamW whose fused kernel can be told on the device that a step is not finite: `found_inf` (a float
    tensor, 1 = skip) is read by torch's fused Adam, which then leaves parameters, moments and step as
    they were (GradScaler sets and removes the same attribute for float16)."""

    found_inf: torch.Tensor | None = None


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, lr: float, *, fused: bool = True
) -> SkippingAdamW:
    """Adam with decoupled weight decay (AdamW) on matrices only; biases, norms get none. With
    weight_decay = 0 this is the paper's Adam."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # The fused kernel (one op for all parameters) where every parameter is a floating CPU/CUDA tensor.
    fused = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + rest)
    return SkippingAdamW(groups, lr=lr, betas=config.betas, eps=config.eps, fused=fused)


def scaled_clipped_norm(model: torch.nn.Module, factor: float, clip_norm: float | None) -> torch.Tensor:
    """Multiply every gradient by `factor`, clip their joint 2-norm to `clip_norm` (None or 0: no
    clipping) and return the norm before clipping, on the device: it says whether the step is finite."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [g for p in params if (g := p.grad) is not None]
    if factor != 1.0 and grads:
        torch._foreach_mul_(grads, factor)  # one call for all (the same products as one mul_ each)
    if clip_norm:
        return torch.nn.utils.clip_grad_norm_(params, clip_norm)
    return total_norm(params, grads)


def total_norm(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of `grads` (the gradients of `params`) together, on their device (no host sync;
    sharded gradients too)."""
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))  # max_norm inf: multiplies by 1


def update(
    optimizer: SkippingAdamW,
    scaler: torch.amp.GradScaler,
    skip: torch.Tensor,
    *,
    fp16: bool,
    mask_on_device: bool,
) -> None:
    """Apply the step unless `skip` (a bool tensor on the device): float16 through the scaler (which
    skips overflowing steps itself), the fused kernel told on the device, other optimisers decided on the
    host (one sync)."""
    if fp16:
        scaler.step(optimizer)  # skips the update when float16 gradients overflowed
    elif mask_on_device:
        optimizer.found_inf = skip.to(torch.float32)
        optimizer.step()  # the fused kernel leaves parameters, moments and step as they were
    elif not bool(skip.item()):  # other optimisers cannot skip on the device: decide on the host
        optimizer.step()
    scaler.update()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (FSDP's replicated gradient norm); any other tensor as it is."""
    local = getattr(t, "to_local", None)
    return local() if callable(local) else t


class NonfiniteFlag:
    """A step's flags, read later without waiting for work queued after it: `skip` (not finite: the step is
    skipped and counted against train.max_nonfinite_skips) and `overflow` (float16: the gradient scaler
    found inf / NaN in the scaled gradients, skipped the update itself and lowered its scale). On CUDA they
    are copied to pinned host memory behind an event, so reading waits for that step only, not for the
    stream."""

    def __init__(self, skip: torch.Tensor, overflow: torch.Tensor | None = None) -> None:
        # FSDP: the gradient norm (so the flags) is a replicated DTensor; its local value is the same on
        # every rank, and a plain tensor stacks, copies and reads
        skip = _local(skip)
        overflow = _local(overflow) if overflow is not None else torch.zeros_like(skip)
        flags = torch.stack([skip, overflow])
        self.event: torch.cuda.Event | None = None
        if flags.device.type == "cuda":
            self.host = torch.empty((2,), dtype=torch.bool, pin_memory=True)
            self.host.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flags

    def read(self) -> tuple[bool, bool]:
        """(skipped as not finite, skipped by the float16 scaler's overflow check)."""
        if self.event is not None:
            self.event.synchronize()
        skip, overflow = self.host.tolist()
        return bool(skip), bool(overflow) and not skip
