"""Small helpers every task uses."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TypeVar

import torch

from tformer.config import model_config_class
from tformer.training.checkpoint import CheckpointError, read_config

M = TypeVar("M", bound=torch.nn.Module)


def progress(iterable: Any, total: int, desc: str) -> Any:
    """A progress bar on a terminal (tqdm decides: none when stderr is not a TTY), gone when done."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def for_inference(model: M, device: str | torch.device, precision: str, *, accel: bool) -> M:
    """A loaded model on `device`, in `precision` and eval mode, with tformer.accel's kernels if asked."""
    from tformer import accel as _accel
    from tformer.inference.precision import apply_precision

    model = apply_precision(model.to(device), precision)
    return _accel.apply(model) if accel else model


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def log(message: str) -> None:
    print(message, file=sys.stderr)


def read_task_config(path: str | Path, task: str) -> tuple[dict[str, Any], Any]:
    """config.json of a checkpoint of `task` -> (the raw dict, the model config). Clear errors otherwise."""
    path = Path(path)
    config = read_config(path)
    if config.get("task") != task:
        raise CheckpointError(f"{path}: a {config.get('task')!r} checkpoint; expected a {task!r} model")
    if "model" not in config:
        raise CheckpointError(f"{path / 'config.json'}: has no 'model' section")
    return config, model_config_class(task).from_dict(config["model"], source=str(path / "config.json"))
