"""Checkpoints are directories, written atomically; everything needed to predict or to resume.

    CHECKPOINT/
      config.json          task, model and train config, tformer version
      model.safetensors    weights (tied weights stored once)
      *tokenizer.json      the task's tokenizer(s)
      trainer_state.pt     optimizer, scheduler, step, epoch, batch position, RNG states, history

A save writes everything to a sibling temporary directory, then swaps it in with renames, so a crash
leaves either the old or the new checkpoint complete, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

import tformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    config: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    trainer_state: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model + config (+ tokenizers through `write_extra`, + trainer state) to `path` atomically.

    `weights`: the model's full state dict when `model` itself holds only a shard (FSDP); tied names
    sharing one tensor are stored once, as for a module."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
    try:
        (tmp / CONFIG).write_text(json.dumps({**config, "tformer_version": tformer.__version__}, indent=2))
        save_model(model if weights is None else _StateDict(weights), str(tmp / WEIGHTS))
        if write_extra is not None:
            write_extra(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE)
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class _StateDict(torch.nn.Module):
    """Presents a ready state dict to safetensors' `save_model` (which drops duplicate tied names)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._state)


def _recover(path: Path) -> None:
    """If a save died between its two renames, the previous checkpoint is still complete under .old."""
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.replace(old, path)


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    _recover(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a directory (config.json + model.safetensors + ...)")
    cfg = path / CONFIG
    if not cfg.exists():
        raise CheckpointError(f"{path}: not a tformer checkpoint ({CONFIG} is missing)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg}: corrupt config ({exc})") from None


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load model.safetensors into `model`, strictly: every tensor present and of the right shape."""
    _recover(Path(path))
    weights = Path(path) / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{Path(path)}: {WEIGHTS} is missing")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: corrupt weights file ({exc})") from None
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"{weights}: weights do not fit the model in config.json ({exc})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not match the model in config.json "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """model.safetensors as a state dict (tied names stored once), for loading into a sharded model."""
    from safetensors.torch import load_file

    _recover(Path(path))
    weights = Path(path) / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{Path(path)}: {WEIGHTS} is missing")
    try:
        return load_file(str(weights))
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: corrupt weights file ({exc})") from None


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    _recover(Path(path))
    state = Path(path) / STATE
    if not state.exists():
        raise CheckpointError(f"{Path(path)}: {STATE} is missing; this checkpoint cannot be resumed")
    try:
        return torch.load(state, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{state}: corrupt trainer state ({exc})") from None
