"""One training loop for every task: Adam, schedule, clipping, evaluation, progress, logs, checkpoints.

The trainer knows nothing about the model's inputs: a task gives it batches (`train_batches(epoch)`), a
loss (`loss(model, batch) -> LossValue(summed loss, count it is averaged over, tokens in the batch)`), an
evaluation (`evaluate(model) -> metrics`) and what the checkpoint needs besides weights
(`checkpoint_config()`, `write_files(dir)`).

Resuming is exact: an epoch's batch order is a function of (seed, epoch), and the checkpoint holds the
position inside the epoch plus every RNG state, so N steps straight and N/2 + resume + N/2 give the same
parameters.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from tformer.config import TrainConfig
from tformer.training.checkpoint import load_trainer_state, load_weights, save_checkpoint
from tformer.training.schedules import make_scheduler, peak_lr


class LossValue(NamedTuple):
    total: torch.Tensor  # summed loss over the batch
    items: int  # what it is averaged over (target tokens, examples)
    tokens: int  # tokens read (for tokens per second)


class Task(Protocol):
    def train_batches(self, epoch: int) -> list[Any]: ...
    def loss(self, model: Any, batch: Any) -> LossValue: ...
    def evaluate(self, model: Any) -> dict[str, float]: ...
    def checkpoint_config(self) -> dict[str, Any]: ...
    def write_files(self, directory: Path) -> None: ...


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    train_time: float = 0.0  # seconds spent in training steps, summed over resumes
    history: list[dict[str, Any]] = field(default_factory=list)  # every train log and eval record


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(model: torch.nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay (AdamW) on matrices only; biases, norms get none. With
    weight_decay = 0 this is the paper's Adam."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # The fused kernel (one op for all parameters) where every parameter is a floating CPU/CUDA tensor.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + rest)
    return torch.optim.AdamW(groups, lr=lr, betas=config.betas, eps=config.eps, fused=fused)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        task: Task,
        config: TrainConfig,
        *,
        out_dir: str | Path,
        progress: bool = True,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.task, self.config = model, task, config
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoint"
        self.log_path = self.out_dir / "log.jsonl"
        self.progress = progress
        c = config
        d_model: int = getattr(model, "config").d_model  # noqa: B009  (every tformer model has a config)
        peak = peak_lr(c.lr, d_model, c.warmup_steps)
        self.optimizer = make_optimizer(model, c, peak)
        self.scheduler = make_scheduler(
            self.optimizer, c.schedule, warmup=c.warmup_steps, total=c.max_steps, min_lr=c.min_lr, peak=peak
        )
        self.state = TrainState()
        self._interrupted = False
        if c.compile:
            model.compile()  # torch.compile of forward, in place: the module, its state dict and names stay
        self.extra_config = extra_config or {}  # more sections for config.json (e.g. the data config)

    # --- checkpoints -------------------------------------------------------------------------------
    def save(self) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "trainer": vars(self.state),
            "rng": _rng_state(),
        }
        config = {**self.task.checkpoint_config(), "train": self.config.to_dict(), **self.extra_config}
        return save_checkpoint(
            self.checkpoint_dir,
            model=self.model,
            config=config,
            write_extra=self.task.write_files,
            trainer_state=state,
        )

    def resume(self) -> None:
        """Restore weights, optimizer, scheduler, position and RNG from `out_dir/checkpoint`."""
        load_weights(self.checkpoint_dir, self.model)
        state = load_trainer_state(self.checkpoint_dir)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainState(**state["trainer"])
        _set_rng_state(state["rng"])
        # Records logged after this checkpoint (a run killed before its next save) will be logged again.
        if self.log_path.exists():
            kept = [
                line
                for line in self.log_path.read_text().splitlines()
                if json.loads(line)["step"] <= self.state.step
            ]
            self.log_path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    # --- the loop ----------------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        c, s = self.config, self.state
        return (c.max_steps is not None and s.step >= c.max_steps) or (
            c.max_time is not None and s.train_time >= c.max_time
        )

    def evaluate(self) -> dict[str, Any]:
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = self.task.evaluate(self.model)
        record = {
            "type": "eval",
            "step": self.state.step,
            "epoch": self.state.epoch,
            "time": self.state.train_time,
            **metrics,
            "eval_seconds": time.perf_counter() - t0,
        }
        self._log(record)
        return record

    def fit(self) -> list[dict[str, Any]]:
        """Train until `epochs`, `max_steps` or `max_time`; evaluate each `eval_every_epochs`; checkpoint.

        Ctrl-C (or SIGTERM) saves a checkpoint at the current step before stopping, so `--resume` loses
        nothing.
        """
        c, s = self.config, self.state
        if s.step == 0 and s.batch_in_epoch == 0 and s.epoch == 0:
            torch.manual_seed(c.seed)
            random.seed(c.seed)
            np.random.seed(c.seed)
        # Ctrl-C / SIGTERM only set a flag; the loop stops between steps, so the checkpoint never holds
        # weights updated by a step it has not counted.
        previous = {}
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop()
        except KeyboardInterrupt:
            self.save()
            print(
                f"\ninterrupted: checkpoint saved at step {s.step} in {self.checkpoint_dir}", file=sys.stderr
            )
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return s.history

    def _autocast(self) -> Any:
        """bfloat16 autocast for the forward pass when `precision = "bf16"` (weights and optimiser stay
        float32); a no-op context otherwise."""
        device = next(self.model.parameters()).device.type
        enabled = self.config.precision == "bf16"
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._interrupted:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._interrupted = True
        print("\nstopping after this step (Ctrl-C again to stop at once) ...", file=sys.stderr)

    def _loop(self) -> None:
        c, s = self.config, self.state
        while s.epoch < c.epochs and not self._should_stop():
            batches = self.task.train_batches(s.epoch)
            bar = tqdm(
                total=len(batches),
                initial=s.batch_in_epoch,
                desc=f"epoch {s.epoch + 1}/{c.epochs}",
                disable=not self.progress,
                leave=False,
                dynamic_ncols=True,
            )
            window_loss: float | torch.Tensor = 0.0
            window_count, window_tokens, window_time = 0, 0, 0.0
            while s.batch_in_epoch < len(batches) and not self._should_stop():
                if self._interrupted:
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                loss_value, n_count, n_tokens = self._step(batches[s.batch_in_epoch])
                dt = time.perf_counter() - t0
                s.train_time += dt
                s.batch_in_epoch += 1
                s.step += 1
                window_loss = window_loss + loss_value
                window_count += n_count
                window_tokens += n_tokens
                window_time += dt
                bar.update(1)
                if s.step % c.log_every == 0:
                    lr = self.scheduler.get_last_lr()[0]
                    loss = float(window_loss) / max(1, window_count)  # the only host sync: once per log
                    if not math.isfinite(loss):
                        raise FloatingPointError(
                            f"training loss became {loss} before step {s.step}; lower the learning rate "
                            f"(now {lr:.3g}) or set clip_norm"
                        )
                    tps = window_tokens / max(window_time, 1e-9)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                    self._log(
                        {
                            "type": "train",
                            "step": s.step,
                            "epoch": s.epoch,
                            "loss": loss,
                            "lr": lr,
                            "tokens_per_s": tps,
                            "time": s.train_time,
                        }
                    )
                    window_loss, window_count, window_tokens, window_time = 0.0, 0, 0, 0.0
                if (
                    c.eval_every_steps
                    and s.step % c.eval_every_steps == 0
                    and s.batch_in_epoch < len(batches)
                ):
                    self._report(self.evaluate())
            bar.close()
            if s.batch_in_epoch >= len(batches):
                s.epoch += 1
                s.batch_in_epoch = 0
                if s.epoch % c.eval_every_epochs == 0 or s.epoch == c.epochs:
                    self._report(self.evaluate())
                    self.save()
        if not s.history or s.history[-1].get("type") != "eval" or s.history[-1]["step"] != s.step:
            self._report(self.evaluate())
            self.save()

    def _report(self, record: dict[str, Any]) -> None:
        if not self.progress:
            return
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in record.items()
            if k not in ("type",)
        )
        tqdm.write(f"eval: {shown}")

    def _step(self, batch: Any) -> tuple[torch.Tensor, int, int]:
        if not self.model.training:  # evaluation switched it off; train() walks every module: only then
            self.model.train()
        with self._autocast():
            loss_sum, n_count, n_tokens = self.task.loss(self.model, batch)
        loss = loss_sum / max(1, n_count)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return loss_sum.detach(), n_count, n_tokens


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
