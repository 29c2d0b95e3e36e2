"""What every family's task shares: reading its files for training (`need`, `one`, `tokenizer`), and the
one `CheckpointPredictor.load` every predictor opens a checkpoint with."""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from tformer.config import ConfigError, RunConfig, model_config_class
from tformer.data.tokenizers import Tokenizer
from tformer.training.checkpoint import CheckpointError, read_config

M = TypeVar("M", bound=torch.nn.Module)
P = TypeVar("P", bound="CheckpointPredictor")
T = TypeVar("T")


class CheckpointPredictor(ABC):
    """Base of the families' predictors: `load` is the one checkpoint loader (config -> the family's model
    -> weights -> device / precision / accel), `from_checkpoint` the family's own files (tokenizers,
    labels). Its model is put in eval mode once and never switched after, so threads may share a
    predictor (tformer.inference.modes)."""

    family: ClassVar[str]  # the task name its checkpoints carry

    @classmethod
    def load(
        cls: type[P],
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        accel: bool = False,
    ) -> P:
        """Open a checkpoint directory (or a run's `checkpoint` link); `precision` "bf16" or "int8"
        converts the model for inference (inference/precision.py); `accel`: tformer.accel's kernels."""
        from tformer.inference.precision import check_precision
        from tformer.models import build_model
        from tformer.training import run_dir
        from tformer.training.checkpoint import load_weights

        check_precision(precision)
        path = run_dir.resolve(path, say=True)  # a link, once: every file from the same save
        raw, model_config = read_task_config(path, cls.family)
        model = build_model(model_config)  # the Transformer or a baseline with its interface
        load_weights(path, model)
        return cls.from_checkpoint(path, raw, for_inference(model, device, precision, accel=accel))

    @classmethod
    @abstractmethod
    def from_checkpoint(cls: type[P], path: Path, raw: Mapping[str, object], model: torch.nn.Module) -> P:
        """The predictor of a loaded `model` and the checkpoint's other files; `raw` is config.json. Each
        family's predictor defines it (an abstract method: a predictor without it cannot be made)."""


def need(config: RunConfig, key: str) -> list[str]:
    """data.train / data.valid's paths, or an error saying how to give them."""
    paths = config.data.paths(key)
    if not paths:
        raise ConfigError(f"no {key} data: give --{key} FILE (or data.{key} in the config)")
    return paths


def one(config: RunConfig, key: str) -> list[str]:
    paths = need(config, key)
    if len(paths) != 1:
        raise ConfigError(f"{config.task}: --{key} takes one file, got {len(paths)}: {paths}")
    return paths


def tokenizer(saved: Path | None, name: str, texts: Iterable[str], config: RunConfig) -> Tokenizer:
    """The tokenizer saved in the checkpoint being resumed, or one trained on the training texts."""
    if saved is not None and (saved / name).exists():
        return Tokenizer.load(saved / name)
    return Tokenizer.train(texts, kind=config.data.tokenizer, vocab_size=config.data.vocab_size)


def progress(iterable: Iterable[T], total: int, desc: str) -> Iterable[T]:
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
