"""Small helpers every task uses."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from tformer.config import model_config_class
from tformer.training.checkpoint import CheckpointError, read_config


def progress(iterable: Any, total: int, desc: str) -> Any:
    """A progress bar on a terminal (tqdm decides: none when stderr is not a TTY), gone when done."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


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
