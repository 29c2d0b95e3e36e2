"""What the trainer and a task agree on, and what a training run is besides its weights.

The trainer knows nothing about the model's inputs: a task gives it batches (`train_batches(epoch)`), a
loss (`loss(model, batch) -> LossValue(summed loss, count it is averaged over, tokens in the batch)`), an
evaluation (`evaluate(model) -> metrics`) and what the checkpoint needs besides weights
(`checkpoint_config()`, `write_files(dir)`).

Resuming is exact: an epoch's batch order is a function of (seed, epoch), and the checkpoint holds the
position inside the epoch (TrainState) plus every RNG state (rng_state), so N steps straight and N/2 +
resume + N/2 give the same parameters.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

BatchT = TypeVar("BatchT")

# One line of log.jsonl and of the checkpoint's history: "type" (train / eval), "step", "epoch", the loss or
# the task's metrics, learning rate, times, memory.
LogRecord = dict[str, float | int | str | None]


class LossValue(NamedTuple):
    total: torch.Tensor  # summed loss over the batch
    items: int  # what it is averaged over (target tokens, examples)
    tokens: int  # tokens read (for tokens per second)


class Task(Protocol[BatchT]):
    """`model` is the module the trainer trains: the task's own model, or a DDP / FSDP wrapper of it in
    training steps; each task annotates it as its own model class, hence no narrower type here."""

    def train_batches(self, epoch: int) -> list[BatchT]: ...
    def loss(self, model: Any, batch: BatchT) -> LossValue: ...
    def evaluate(self, model: Any) -> dict[str, float]: ...
    def checkpoint_config(self) -> dict[str, object]: ...
    def write_files(self, directory: Path) -> None: ...


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    train_time: float = 0.0  # seconds spent in training steps, summed over resumes
    history: list[LogRecord] = field(default_factory=list)  # every train log and eval record
    nonfinite_skips: int = 0  # steps skipped because their gradient was not finite
    overflow_skips: int = 0  # float16: updates the gradient scaler skipped (overflow; its scale then drops)
    best_value: float | None = None  # train.keep_best: the best evaluation's metric so far (rank 0's)
    best_step: int | None = None  # and its step
    evals_since_best: int = 0  # evaluations since then (train.patience counts them)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal; `signum` gives the exit status (128 + signum: 130 SIGINT, 143 SIGTERM),
    `saved` the checkpoint written on the way out (None: stopped at once, the last one stands)."""

    def __init__(self, signum: int, saved: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved


def rng_state() -> dict[str, object]:
    """Every random stream training draws from: torch's (and CUDA's), Python's, numpy's."""
    state: dict[str, object] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s streams; `state` comes from a checkpoint (checked by the setters)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
