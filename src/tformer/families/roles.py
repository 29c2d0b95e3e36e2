"""What each "module:symbol" of a `Family` must be: one Protocol per role. Torch-free at run time (the
types named here are imported for the type checker only); `Family` checks each object on import."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tformer.config import DataConfig, RunConfig, TransformerConfig
    from tformer.training.trainer import Task


@runtime_checkable
class ModelBuilder(Protocol):
    """A model class (or function): the family's config -> an nn.Module."""

    def __call__(self, config: TransformerConfig) -> nn.Module: ...


@runtime_checkable
class TaskBuilder(Protocol):
    """`tformer train`'s first half: read the files, build the tokenizers, the task and the model.
    `saved`: the checkpoint being resumed, whose tokenizers are reused."""

    def __call__(self, config: RunConfig, saved: Path | None) -> tuple[Task, nn.Module]: ...


class Predictor(Protocol):
    """A loaded checkpoint ready to predict; its model in eval mode (ONNX export and viz read it)."""

    @property
    def model(self) -> nn.Module: ...


@runtime_checkable
class PredictorClass(Protocol):
    """The predictor's class: `load` opens a checkpoint directory (or a run's `checkpoint` link)."""

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        accel: bool = False,
    ) -> Predictor: ...


@dataclass(frozen=True)
class EvalRequest:
    """`tformer eval`'s options; each family reads the ones it has (columns: None = as trained)."""

    trained: DataConfig  # the [data] section the checkpoint was trained with
    beam_size: int = 4
    text_column: str | None = None
    label_column: str | None = None
    precision: str = "fp32"
    accel: bool = False


@runtime_checkable
class Evaluator(Protocol):
    """A checkpoint of the family scored on data files -> metrics (printed one per line)."""

    def __call__(self, path: Path, data: list[str], request: EvalRequest) -> dict[str, Any]: ...


@runtime_checkable
class CommandAdder(Protocol):
    """Adds the family's own subcommands (e.g. `translate`) to `tformer`'s subparsers."""

    def __call__(self, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...
