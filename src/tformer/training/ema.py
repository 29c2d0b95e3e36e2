"""train.ema: an exponential moving average of the weights during training (Polyak averaging; the
"EMA" of timm and fairseq's --ema-decay): after every optimiser step that was taken,
ema = decay * ema + (1 - decay) * param, for every floating-point parameter, starting from the
parameters training starts with. Buffers (batch-norm statistics) are not averaged: the EMA's state dict
takes them from the raw model.

Only trained parameters are averaged (with LoRA: the adapters and the head, not the frozen base).
The average is kept in float32 (float64 for a float64 parameter) on the parameters' device, rank 0 only
(DDP replicas are equal; FSDP is refused: decision 88). When the update happens: the trainer learns
whether a step was skipped as non-finite one step later (run.py `_settle`), and the parameters are still
that step's result then (every reader, evaluation and save, settles first, and the next update is queued
after it), so the EMA is updated there, only for steps that were taken, with no mask on the device.

Saved beside the weights as ema.safetensors (the keys of model.safetensors: a complete set of weights for
the model, so `tformer average CKPT OUT --ema` makes it a checkpoint of its own); resume reads it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tformer.training.checkpoint import CheckpointError, save_weights

EMA_WEIGHTS = "ema.safetensors"


class EMA:
    """The moving average of `module`'s floating-point parameters (`decay` in (0, 1))."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        # the trained parameters: with LoRA (training/lora.py) the adapters and head, not the frozen base
        self._params = [
            (n, p) for n, p in module.named_parameters() if p.is_floating_point() and p.requires_grad
        ]
        self.shadow = {
            n: p.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32, copy=True)
            for n, p in self._params
        }

    @torch.no_grad()
    def update(self) -> None:
        """One taken optimiser step: ema = decay * ema + (1 - decay) * param."""
        emas = list(self.shadow.values())
        params = [p.detach().to(e.dtype) for (_, p), e in zip(self._params, emas, strict=True)]
        torch._foreach_mul_(emas, self.decay)
        torch._foreach_add_(emas, params, alpha=1.0 - self.decay)

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`module`'s state dict with each floating-point parameter's average in its place (tied names share
        one tensor, so the file keeps the keys model.safetensors keeps); buffers from the raw model."""
        by_id = {id(p): self.shadow[n] for n, p in self._params}
        return {k: by_id.get(id(v), v.detach()) for k, v in module.state_dict(keep_vars=True).items()}

    def write(self, directory: Path, module: torch.nn.Module) -> None:
        """ema.safetensors; beside an adapter checkpoint (LoRA: frozen parameters) only the averaged tensors,
        as model.safetensors holds only the trained ones."""
        state = self.state_dict(module)
        if any(not p.requires_grad for p in module.parameters()):
            names = {n for n, _ in self._params}
            state = {k: v for k, v in state.items() if k in names}
        save_weights(state, directory / EMA_WEIGHTS)

    def load(self, directory: Path, module: torch.nn.Module) -> bool:
        """The average saved in a checkpoint directory (False: it has none, e.g. trained without EMA)."""
        path = directory / EMA_WEIGHTS
        if not path.exists():
            return False
        try:
            saved = load_file(str(path))
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: corrupt weights file ({exc})") from None
        by_id = {id(p): n for n, p in self._params}
        found: set[str] = set()
        with torch.no_grad():
            for key, v in module.state_dict(keep_vars=True).items():
                name = by_id.get(id(v))
                if name is None or key not in saved or name in found:
                    continue
                if saved[key].shape != self.shadow[name].shape:
                    raise CheckpointError(
                        f"{path}: {key} has shape {tuple(saved[key].shape)}, the model's is "
                        f"{tuple(self.shadow[name].shape)}"
                    )
                self.shadow[name].copy_(saved[key])
                found.add(name)
        missing = [n for n in self.shadow if n not in found]
        if missing:
            raise CheckpointError(f"{path}: no average for {missing[0]} ({len(missing)} parameters missing)")
        return True

    @contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[None]:
        """`module` with the averaged weights, then its own again, exactly (a copy is kept meanwhile)."""
        raw = [p.detach().clone() for _, p in self._params]
        try:
            with torch.no_grad():
                for (_, p), e in zip(self._params, self.shadow.values(), strict=True):
                    p.copy_(e)
            yield
        finally:
            with torch.no_grad():
                for (_, p), r in zip(self._params, raw, strict=True):
                    p.copy_(r)
