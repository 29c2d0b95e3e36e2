"""One training loop for every task: Adam, schedule, clipping, evaluation, progress, logs, checkpoints.

The trainer knows nothing about the model's inputs: a task gives it batches (`train_batches(epoch)`), a
loss (`loss(model, batch) -> LossValue(summed loss, count it is averaged over, tokens in the batch)`), an
evaluation (`evaluate(model) -> metrics`) and what the checkpoint needs besides weights
(`checkpoint_config()`, `write_files(dir)`).

Resuming is exact: an epoch's batch order is a function of (seed, epoch), and the checkpoint holds the
position inside the epoch plus every RNG state, so N steps straight and N/2 + resume + N/2 give the same
parameters.

Several processes (torchrun; see `distributed.py`): one optimiser step takes the next `world size x
accumulate` batches of the epoch's list, rank r the r-th group of `accumulate` of them, so a step's global
batch does not depend on how it is split. The loss of a step is the sum of every batch's summed loss over
the global count of items (tokens, examples), exactly as one process would compute it over the same
batches. Positions in the checkpoint are global (steps, batches of the epoch), so it resumes at any world
size. Only rank 0 logs, shows progress and writes checkpoints.
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
from typing import Any, NamedTuple, Protocol, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from tformer.allocator import reuse_freed_memory
from tformer.config import ConfigError, TrainConfig
from tformer.training import distributed
from tformer.training.checkpoint import (
    WEIGHTS,
    CheckpointError,
    load_trainer_state,
    load_weights,
    read_weights,
    save_checkpoint,
)
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


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, lr: float, *, fused: bool = True
) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay (AdamW) on matrices only; biases, norms get none. With
    weight_decay = 0 this is the paper's Adam."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # The fused kernel (one op for all parameters) where every parameter is a floating CPU/CUDA tensor.
    fused = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + rest)
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
        self.task, self.config = task, config
        c = config
        self.world = distributed.setup(c.device)
        _check_precision(c, self.world)
        self.module = model.to(self.world.device)  # the tformer model: evaluation, config, checkpoints
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoint"
        self.log_path = self.out_dir / "log.jsonl"
        self.progress = progress and self.world.is_main
        d_model: int = getattr(model, "config").d_model  # noqa: B009  (every tformer model has a config)
        peak = peak_lr(c.lr, d_model, c.warmup_steps)
        if c.compile:
            model.compile()  # torch.compile of forward, in place: the module, its state dict and names stay
        self.model = distributed.wrap(model, self.world, c.parallel)  # what training steps call
        self.optimizer = make_optimizer(self.model, c, peak, fused=not distributed.is_sharded(self.model))
        self.scheduler = make_scheduler(
            self.optimizer, c.schedule, warmup=c.warmup_steps, total=c.max_steps, min_lr=c.min_lr, peak=peak
        )
        # float16 needs its loss scaled so small gradients survive; a no-op for fp32 / bf16.
        self.scaler = torch.amp.GradScaler(self.world.device.type, enabled=c.precision == "fp16")
        self.state = TrainState()
        self._interrupted = False  # Ctrl-C / SIGTERM seen by this process
        self._stop_agreed = False  # every rank knows to stop after the current step
        self._interrupt_agreed = False  # ... because one of them was interrupted
        self.extra_config = extra_config or {}  # more sections for config.json (e.g. the data config)

    # --- checkpoints -------------------------------------------------------------------------------
    def save(self, *, collective: bool = True) -> Path:
        """Write the checkpoint from rank 0: full (unsharded) weights and optimiser state keyed by parameter
        name, so it resumes at any world size. Every rank must call it (FSDP gathers the shards), unless
        `collective` is False (an abrupt stop on one rank: only an unsharded rank 0 can still save)."""
        w = self.world
        sharded = distributed.is_sharded(self.model)
        if not collective and w.distributed and (sharded or not w.is_main):
            return self.checkpoint_dir
        weights = distributed.full_model_state(self.model) if sharded else None
        optimizer = distributed.full_optimizer_state(self.model, self.optimizer)
        rngs = distributed.gather_objects(w, _rng_state()) if collective else [_rng_state()]
        if w.is_main:
            state = {
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "trainer": vars(self.state),
                "rng": rngs[0],
                "rng_ranks": rngs,
                "world_size": w.size,
                "accumulate": self.config.accumulate,
            }
            config = {**self.task.checkpoint_config(), "train": self.config.to_dict(), **self.extra_config}
            save_checkpoint(
                self.checkpoint_dir,
                model=self.module,
                weights=weights,
                config=config,
                write_extra=self.task.write_files,
                trainer_state=state,
            )
        if collective:
            distributed.barrier(w)  # nobody reads a checkpoint rank 0 is still writing
        return self.checkpoint_dir

    def resume(self) -> None:
        """Restore weights, optimizer, scheduler, position and RNG from `out_dir/checkpoint` (written at
        any world size)."""
        w = self.world
        if distributed.is_sharded(self.model):
            try:
                distributed.load_model_state(self.model, read_weights(self.checkpoint_dir))
            except (RuntimeError, KeyError) as exc:
                raise CheckpointError(
                    f"{self.checkpoint_dir / WEIGHTS}: weights do not fit the model in config.json ({exc})"
                ) from None
        else:
            load_weights(self.checkpoint_dir, self.module)
        state = load_trainer_state(self.checkpoint_dir)
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["trainer"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == w.size:
            _set_rng_state(ranks[w.rank])
        elif w.is_main:
            _set_rng_state(state["rng"])
        else:  # a new world size: rank 0 continues its stream, the others start fresh ones
            _seed_all(self.config.seed + w.rank + 1_000_003 * self.state.step)
        before = state.get("world_size", 1) * state.get("accumulate", 1)
        now = w.size * self.config.accumulate
        if before != now and self.progress:
            tqdm.write(
                f"note: the checkpoint took {before} batches per step (processes x accumulate); "
                f"this run takes {now}"
            )
        # Records logged after this checkpoint (a run killed before its next save) will be logged again.
        if w.is_main and self.log_path.exists():
            kept = [
                line
                for line in self.log_path.read_text().splitlines()
                if json.loads(line)["step"] <= self.state.step
            ]
            self.log_path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if not self.world.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    # --- the loop ----------------------------------------------------------------------------------
    def _time_up(self) -> bool:
        c = self.config
        return c.max_time is not None and self.state.train_time >= c.max_time

    def _should_stop(self) -> bool:
        """Between steps. With several ranks the time limit is decided on rank 0 and agreed on in the next
        step (ranks measure different times; all must take the same number of steps)."""
        c, s = self.config, self.state
        if c.max_steps is not None and s.step >= c.max_steps:
            return True
        return self._stop_agreed if self.world.distributed else self._time_up()

    def evaluate(self) -> dict[str, Any]:
        """Evaluate on rank 0 (on every rank under FSDP, whose forward needs all of them); the others
        record the evaluation's place without metrics."""
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {}
        if self.world.is_main or distributed.is_sharded(self.model):
            self.module.eval()
            with torch.no_grad():
                metrics = self.task.evaluate(self.module)
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
        reuse_freed_memory()  # no page faults on the step's big tensors (tformer.allocator)
        if s.step == 0 and s.batch_in_epoch == 0 and s.epoch == 0:
            _seed_all(c.seed + self.world.rank)  # rank 0 (and a single process) draws from `seed`
        # Ctrl-C / SIGTERM only set a flag; the loop stops between steps, so the checkpoint never holds
        # weights updated by a step it has not counted.
        previous = {}
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop()
        except KeyboardInterrupt:
            # Agreed between steps: every rank saves together; a second Ctrl-C on one rank: no collectives.
            w = self.world
            collective = self._interrupt_agreed or not w.distributed
            self.save(collective=collective)
            if w.is_main and (collective or not distributed.is_sharded(self.model)):
                print(
                    f"\ninterrupted: checkpoint saved at step {s.step} in {self.checkpoint_dir}",
                    file=sys.stderr,
                )
            elif w.is_main:
                print(
                    "\ninterrupted at once: a sharded (FSDP) model cannot be saved by one rank",
                    file=sys.stderr,
                )
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return s.history

    def _autocast(self) -> Any:
        """bfloat16 / float16 autocast for the forward pass when `precision` asks (weights and optimiser
        stay float32); a no-op context for fp32."""
        precision = self.config.precision
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.world.device.type, dtype=dtype, enabled=precision != "fp32")

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._interrupted:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._interrupted = True
        print("\nstopping after this step (Ctrl-C again to stop at once) ...", file=sys.stderr)

    def _loop(self) -> None:
        c, s, w = self.config, self.state, self.world
        per_step = w.size * c.accumulate  # batches of the epoch's list one optimiser step takes
        while s.epoch < c.epochs and not self._should_stop():
            batches = self.task.train_batches(s.epoch)
            if len(batches) < per_step:
                raise ConfigError(
                    f"an epoch has {len(batches)} batches, fewer than one step takes (processes x "
                    f"train.accumulate = {w.size} x {c.accumulate}); make batches smaller "
                    "(train.batch_tokens / train.batch_size) or give more data"
                )
            # Each step takes `per_step` batches; the last len % per_step are left out of the epoch, so
            # every rank runs the same number of steps (a rank with one batch less would hang the others).
            bar = tqdm(
                total=len(batches) // per_step,
                initial=s.batch_in_epoch // per_step,
                desc=f"epoch {s.epoch + 1}/{c.epochs}",
                disable=not self.progress,
                leave=False,
                dynamic_ncols=True,
            )
            window_loss: float | torch.Tensor = 0.0
            window_count, window_tokens, window_time = 0, 0, 0.0
            while s.batch_in_epoch + per_step <= len(batches) and not self._should_stop():
                if self._interrupted and (self._interrupt_agreed or not w.distributed):
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                first = s.batch_in_epoch + w.rank * c.accumulate
                loss_value, n_count, n_tokens = self._step(batches[first : first + c.accumulate])
                dt = time.perf_counter() - t0
                s.train_time += dt
                s.batch_in_epoch += per_step
                s.step += 1
                window_loss = window_loss + loss_value
                window_count += n_count
                window_tokens += n_tokens
                window_time += dt
                bar.update(1)
                if s.step % c.log_every == 0:
                    lr = self.scheduler.get_last_lr()[0]
                    # The only host sync: once per log. Sums over ranks: the loss of the global batches.
                    total, count, tokens = distributed.sum_on_host(
                        w, [float(window_loss), window_count, window_tokens]
                    )
                    loss = total / max(1, count)
                    if not math.isfinite(loss):
                        raise FloatingPointError(
                            f"training loss became {loss} before step {s.step}; lower the learning rate "
                            f"(now {lr:.3g}) or set clip_norm"
                        )
                    tps = tokens / max(window_time, 1e-9)
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
                    and s.batch_in_epoch + per_step <= len(batches)
                ):
                    self._report(self.evaluate())
            bar.close()
            if s.batch_in_epoch + per_step > len(batches):
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

    def _step(self, batches: list[Any]) -> tuple[torch.Tensor, int, int]:
        """One optimiser step over this rank's `accumulate` batches. Returns this rank's summed loss, item
        and token counts.

        The gradient is that of sum(summed losses) / N, N the items of the whole global batch (all ranks,
        all micro-batches), as one process would compute it. N is known only after every forward, so each
        micro-batch's loss is divided by `scale` (the same on every rank, about N / world size) and the
        gradient multiplied by world size x scale / N at the end (DDP and FSDP average over ranks).
        """
        if not self.module.training:  # evaluation switched it off; train() walks every module: only then
            self.model.train()  # (through a DDP wrapper, whose own flag evaluation of the module leaves alone)
        w = self.world
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum: torch.Tensor | float = 0.0
        items = tokens = 0
        scale = 1.0
        for j, batch in enumerate(batches):
            with distributed.set_gradient_sync(self.model, j == len(batches) - 1):
                with self._autocast():
                    total, n_items, n_tokens = self.task.loss(self.model, batch)
                if j == 0:
                    (first,) = distributed.sum_on_host(w, [n_items])
                    scale = max(1.0, first / w.size * len(batches))
                self.scaler.scale(total / scale).backward()
            loss_sum = loss_sum + total.detach()
            items += n_items
            tokens += n_tokens
        # Ranks agree here on the global count and on stopping after this step (Ctrl-C, time).
        time_up = w.is_main and self._time_up()
        n_global, interrupted, stop = distributed.sum_on_host(w, [items, float(self._interrupted), time_up])
        if w.distributed:
            self._interrupt_agreed = interrupted > 0
            self._interrupted = self._interrupted or self._interrupt_agreed
            self._stop_agreed = stop > 0
        self.scaler.unscale_(self.optimizer)  # float16: back to true gradients (and inf / NaN found)
        factor = w.size * scale / max(1.0, n_global)
        if factor != 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
        if self.config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
        self.scaler.step(self.optimizer)  # skips the update when float16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        return cast(torch.Tensor, loss_sum), items, tokens


def _check_precision(config: TrainConfig, world: distributed.World) -> None:
    device, precision = world.device, config.precision
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision = 'fp16' needs a CUDA GPU (float16 autocast with a gradient scaler); this run "
            f"is on {device.type}: use 'bf16' (bfloat16 autocast) or 'fp32' there"
        )
    if precision == "fp16" and world.distributed and config.parallel == "fsdp":
        raise ConfigError(
            "train.precision = 'fp16' with train.parallel = 'fsdp' is not supported (each rank would see "
            "only its shard's overflows); use 'bf16', or 'ddp'"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.precision = 'bf16': {torch.cuda.get_device_name(device)} has no bfloat16; use 'fp16'"
        )


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
