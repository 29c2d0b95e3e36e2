"""How the experiments train: every model through `tformer.training.Trainer`, as `tformer train` does
(AdamW, `training.schedules`' cosine schedule with linear warm-up, gradient clipping, log and checkpoint in
a run directory), on batches the experiment makes in advance: one per optimiser step, the whole run one
epoch, so every model of an experiment sees the same batches in the same order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, NamedTuple, TypedDict, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tformer import accel
from tformer.config import TrainConfig
from tformer.training.state import LogRecord
from tformer.training.trainer import LossValue, Trainer

BatchT = TypeVar("BatchT")


class Point(NamedTuple):
    """One point of a training curve: the step, the training loss averaged over the steps since the
    previous point, and the evaluation then (None: the experiment evaluates after training only)."""

    step: int
    train_loss: float
    valid_loss: float | None


@dataclass
class GeneratedTask(Generic[BatchT]):
    """The Trainer's task over an experiment's generated batches: `loss_fn(model, batch)` gives the summed
    loss and what it is averaged over; `evaluate(model)` a validation loss recorded as "valid_loss"."""

    batches: list[BatchT]
    loss_fn: Callable[[nn.Module, BatchT], LossValue]
    model_config: dict[str, object]
    evaluate_fn: Callable[[nn.Module], float] | None = None

    def train_batches(self, epoch: int) -> list[BatchT]:
        return self.batches

    def loss(self, model: nn.Module, batch: BatchT) -> LossValue:
        return self.loss_fn(model, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {} if self.evaluate_fn is None else {"valid_loss": self.evaluate_fn(model)}

    def checkpoint_config(self) -> dict[str, object]:
        return {"task": "experiment", "model": self.model_config}

    def write_files(self, directory: Path) -> None:
        """Nothing besides the weights: an experiment's model has no tokenizer."""


def fit(
    model: nn.Module,
    batches: list[BatchT],
    loss_fn: Callable[[nn.Module, BatchT], LossValue],
    out: Path,
    *,
    lr: float,
    warmup: int,
    every: int = 0,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> list[Point]:
    """Train `model` one step per batch through the Trainer into the run directory `out`: AdamW at peak
    `lr` (betas and eps of `TrainConfig`, the paper's), cosine decay to 0 after `warmup` linear steps, the
    gradient norm clipped to 1, float32. With `every`, the training loss is logged and `evaluate(model)`
    recorded every `every` steps (len(batches) must be a multiple of it); both are also recorded at the end.

    The model gets tformer.accel's kernels (in place), as the command line's training does; it is left in
    eval mode."""
    steps = len(batches)
    if every and steps % every:
        raise ValueError(
            f"{steps} steps are not a multiple of every = {every}; the last point would be partial"
        )
    accel.apply(model)
    config = TrainConfig(
        epochs=1,
        max_steps=steps,
        lr=lr,
        schedule="cosine",
        warmup_steps=warmup,
        clip_norm=1.0,
        eval_every_steps=every or None,
        log_every=every or steps,
        save_every_steps=None,
        keep_checkpoints=1,
        precision="fp32",  # what the experiments measure: no machine-dependent autocast
        device="cuda" if next(model.parameters()).is_cuda else "cpu",
    )
    model_config = getattr(model, "config")  # noqa: B009  (every tformer model has a config)
    task = GeneratedTask(batches, loss_fn, model_config.to_dict(), evaluate)
    trainer = Trainer(model, task, config, out_dir=out, progress=False, command="experiment", rerun=True)
    return curve(trainer.fit())


def curve(history: list[LogRecord]) -> list[Point]:
    """The Trainer's history as points: each evaluation with the training loss logged at its step."""
    train_loss: dict[int, float] = {}
    points = []
    for r in history:
        step, loss, valid = r["step"], r.get("loss"), r.get("valid_loss")
        assert isinstance(step, int), r
        if r["type"] == "train" and isinstance(loss, float):
            train_loss[step] = loss
        elif r["type"] == "eval":
            points.append(Point(step, train_loss[step], valid if isinstance(valid, float) else None))
    return points


class CharLMSettings(TypedDict):
    """The sizes a character LM experiment trains at: batch x block characters, `steps`, `every`."""

    batch: int
    block: int
    steps: int
    every: int


def lm_batch(
    ids: torch.Tensor, batch: int, block: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random windows of `block` + 1 ids: inputs (B, T) and next-token targets (B, T)."""
    starts = torch.randint(len(ids) - block - 1, (batch,), generator=g)
    w = ids[starts[:, None] + torch.arange(block + 1)]
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def lm_valid_loss(
    model: nn.Module, ids: torch.Tensor, block: int, batches: int = 8, batch: int = 16
) -> float:
    """Mean next-token loss on `batches` fixed random windows of the validation ids (same for every model)."""
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(batches):
        x, y = lm_batch(ids, batch, block, g)
        logits = model(x).logits
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    return total / batches


def char_lm_batches(
    train_ids: torch.Tensor, settings: CharLMSettings
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch sequence every model of a character LM experiment trains on (seed 0)."""
    g = torch.Generator().manual_seed(0)
    return [lm_batch(train_ids, settings["batch"], settings["block"], g) for _ in range(settings["steps"])]


def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> LossValue:
    x, y = batch
    logits = model(x).logits  # (B, T, V)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
    return LossValue(total, y.numel(), x.numel())


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> LossValue:
    """Summed cross-entropy of a classifier on (ids (B, T), labels (B,))."""
    x, y = batch
    return LossValue(F.cross_entropy(model(x).logits, y, reduction="sum"), y.numel(), x.numel())


def fit_char_lm(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    valid_ids: torch.Tensor,
    settings: CharLMSettings,
    out: Path,
    *,
    lr: float,
) -> list[Point]:
    """`fit` a character LM on `batches` (char_lm_batches) with warm-up over the first tenth of the steps
    and the validation loss recorded every `every` steps."""
    block = settings["block"]
    return fit(
        model,
        batches,
        next_token_loss,
        out,
        lr=lr,
        warmup=settings["steps"] // 10,
        every=settings["every"],
        evaluate=lambda m: lm_valid_loss(m, valid_ids, block),
    )
