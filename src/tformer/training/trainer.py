"""One training loop for every task: Adam, schedule, clipping, evaluation, progress, logs, checkpoints.

The trainer knows nothing about the model's inputs: a task gives it batches (`train_batches(epoch)`), a
loss (`loss(model, batch) -> LossValue(summed loss, count it is averaged over, tokens in the batch)`), an
evaluation (`evaluate(model) -> metrics`) and what the checkpoint needs besides weights
(`checkpoint_config()`, `write_files(dir)`).

Resuming is exact: an epoch's batch order is a function of (seed, epoch), and the checkpoint holds the
position inside the epoch plus every RNG state, so N steps straight and N/2 + resume + N/2 give the same
parameters.

Nothing non-finite reaches a checkpoint: every step checks its gradient norm on the device (no host sync:
the fused optimiser skips its own update when the flag is set, and the host reads the flag one step
later, while the next step's work is already queued). A skipped step consumes its batches but does not
advance the step counter or the schedule; after `max_nonfinite_skips` of them training stops with an
error. Parameters are checked again before every save. float16's GradScaler overflow skips are its own.

Several processes (torchrun; see `distributed.py`): one optimiser step takes the next `world size x
accumulate` batches of the epoch's list, rank r the r-th group of `accumulate` of them, so a step's global
batch does not depend on how it is split. The loss of a step is the sum of every batch's summed loss over
the global count of items (tokens, examples), exactly as one process would compute it over the same
batches. Positions in the checkpoint are global (steps, batches of the epoch), so it resumes at any world
size. Only rank 0 logs, shows progress and writes checkpoints.
"""

from __future__ import annotations

import json
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

from tformer import accel
from tformer.accel.precision import confirm_by_step
from tformer.accel.precision import resolve as resolve_precision
from tformer.config import ConfigError, TrainConfig
from tformer.memory import peak_rss_bytes
from tformer.training import distributed, run_dir
from tformer.training.checkpoint import (
    STATE,
    WEIGHTS,
    CheckpointError,
    load_trainer_state,
    load_weights,
    read_weights,
    require,
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
    nonfinite_skips: int = 0  # steps skipped because their gradient was not finite


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal; `signum` gives the exit status (128 + signum: 130 SIGINT, 143 SIGTERM),
    `saved` the checkpoint written on the way out (None: stopped at once, the last one stands)."""

    def __init__(self, signum: int, saved: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved


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
        command: str = "train",
        overwrite: bool = False,
        rerun: bool = False,
    ) -> None:
        """`command`, `overwrite`, `rerun`: who owns `out_dir` (run_dir.claim): a fresh `fit` into a
        directory another run wrote needs `overwrite`, or `rerun` when the same command wrote it."""
        self.world = distributed.setup(config.device)
        # "auto" becomes what this machine runs fastest (accel/precision.py): config.json records that
        self.asked_precision = config.precision
        resolved, why = resolve_precision(config.precision, self.world.device)
        if config.precision == "auto":
            if self.world.distributed:  # every rank computes alike: rank 0's measurement
                resolved = distributed.from_rank0(self.world, resolved)
            if self.world.is_main:
                print(f"precision: auto -> {resolved} ({why})", file=sys.stderr)
        # the product rule's bf16 is confirmed on the model's own step before the first one (_confirm_auto)
        self._confirm = config.precision == "auto" and resolved == "bf16"
        self.task, self.config = task, config.replace(precision=resolved)
        c = self.config
        _check_precision(c, self.world)
        self.module = model.to(self.world.device)  # the tformer model: evaluation, config, checkpoints
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / run_dir.LATEST  # a link to the latest checkpoint-<step>/
        self.log_path = self.out_dir / run_dir.LOG
        self.command, self.overwrite, self.rerun = command, overwrite, rerun
        self.progress = progress and self.world.is_main
        d_model: int = getattr(model, "config").d_model  # noqa: B009  (every tformer model has a config)
        peak = peak_lr(c.lr, d_model, c.warmup_steps)
        if c.compile:
            model.compile()  # torch.compile of forward, in place: the module, its state dict and names stay
        if self.world.distributed:  # the kernels of training products: rank 0's choices on every rank
            accel.agree(model, lambda _name, winner: distributed.from_rank0(self.world, winner))
        self.model = distributed.wrap(model, self.world, c.parallel)  # what training steps call
        self.optimizer = make_optimizer(self.model, c, peak, fused=not distributed.is_sharded(self.model))
        self.scheduler = make_scheduler(
            self.optimizer, c.schedule, warmup=c.warmup_steps, total=c.max_steps, min_lr=c.min_lr, peak=peak
        )
        # float16 needs its loss scaled so small gradients survive; a no-op for fp32 / bf16.
        self.scaler = torch.amp.GradScaler(self.world.device.type, enabled=c.precision == "fp16")
        # The fused AdamW skips its update on the device when told a step was not finite (found_inf).
        self._mask_on_device = bool(self.optimizer.defaults.get("fused")) and c.precision != "fp16"
        self.state = TrainState()
        self._resumed = False  # resume() ran: out_dir is claimed
        self._pending: _Flag | None = None  # the last step's non-finite flag, not yet read
        self._step_rng: dict[str, Any] | None = None  # RNG states at the start of the running step
        self._updating = False  # an optimiser update the step counter has not counted yet
        self._critical = False  # counters being changed: a second signal waits for the end (_on_signal)
        self._deferred = 0  # a second signal that arrived in a critical region
        self._saved_at: tuple[int, int] | None = None  # (step, records) of the checkpoint on disk
        self._signal = 0  # the signal this process received (SIGINT / SIGTERM)
        self._lock: int | None = None  # run_dir.lock on out_dir while this trainer trains (rank 0)
        self._interrupted = False  # Ctrl-C / SIGTERM seen by this process
        self._stop_agreed = False  # every rank knows to stop after the current step
        self._interrupt_agreed = False  # ... because one of them was interrupted
        self.extra_config = extra_config or {}  # more sections for config.json (e.g. the data config)

    # --- checkpoints -------------------------------------------------------------------------------
    def save(self, *, collective: bool = True) -> Path:
        """Write the checkpoint from rank 0: full (unsharded) weights and optimiser state keyed by parameter
        name, so it resumes at any world size. Every rank must call it (FSDP gathers the shards), unless
        `collective` is False (an abrupt stop on one rank: only an unsharded rank 0 can still save)."""
        w, s = self.world, self.state
        sharded = distributed.is_sharded(self.model)
        if not collective and w.distributed and (sharded or not w.is_main):
            return self.checkpoint_dir
        self._settle(collective)
        if self._saved_at == (s.step, len(s.history)):
            return self.checkpoint_dir  # this very state is on disk already
        self._check_parameters(collective)
        weights = distributed.full_model_state(self.model) if sharded else None
        optimizer = distributed.full_optimizer_state(self.model, self.optimizer)
        # Stopped inside a step, before its update: the state is the step's start, RNG included.
        rng = self._step_rng or _rng_state()
        rngs = distributed.gather_objects(w, rng) if collective else [rng]
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
                "precision": self.config.precision,  # as resolved: a resumed "auto" run keeps it
                "accel": accel.recorded(self.module),  # the kernels chosen per shape class (None: stock)
            }
            config = {**self.task.checkpoint_config(), "train": self.config.to_dict(), **self.extra_config}
            run_dir.save(
                self.out_dir,
                step=s.step,
                keep=self.config.keep_checkpoints,
                model=self.module,
                weights=weights,
                config=config,
                write_extra=self.task.write_files,
                trainer_state=state,
            )
        if collective:
            distributed.barrier(w)  # nobody reads a checkpoint rank 0 is still writing
        self._saved_at = (s.step, len(s.history))
        return self.checkpoint_dir

    def _check_parameters(self, collective: bool) -> None:
        """Refuse to save parameters that are not finite (a weight can become NaN or inf while the loss
        is still finite); every rank checks its own (shards) and all agree."""
        bad = []
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP shard
                if local.numel() and not bool(torch.isfinite(local).all()):
                    bad.append(name)
        (n_bad,) = distributed.sum_on_host(self.world, [len(bad)]) if collective else [len(bad)]
        if n_bad:
            last = run_dir.latest(self.out_dir)
            where = f"{bad[0]} and {len(bad) - 1} more" if len(bad) > 1 else (bad[0] if bad else "a shard")
            raise FloatingPointError(
                f"step {self.state.step}: parameters are not finite (NaN or inf: {where}); not saving them. "
                f"The last checkpoint ({last or 'none yet'}) is kept; lower train.lr or raise train.eps"
            )

    def _checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: the weights, Adam's two moments, 1 MiB for the rest."""
        n = sum(t.numel() * t.element_size() for t in {id(p): p for p in self.module.parameters()}.values())
        return 3 * n + 2**20

    def resume(self) -> bool:
        """Restore weights, optimizer, scheduler, position and RNG from the run's latest checkpoint
        (written at any world size). False when there is none yet: training starts from scratch."""
        w = self.world
        if w.is_main:
            self._hold_out_dir()
        try:
            return self._resume()
        except BaseException:
            self._release_out_dir()
            raise

    def _resume(self) -> bool:
        w = self.world
        if w.is_main:
            run_dir.claim(self.out_dir, command=self.command, resume=True)
        distributed.barrier(w)
        self._resumed = True
        found = run_dir.latest(self.out_dir)
        if found is None:
            if w.is_main:
                run_dir.rewrite_log(self.out_dir, [])  # records of a run that died before its first save
            return False
        state = load_trainer_state(found)  # first: a tformer 0.1 state is refused before anything loads
        require(state, found, "optimizer", "scheduler", "trainer", "rng")
        if distributed.is_sharded(self.model):
            try:
                distributed.load_model_state(self.model, read_weights(found))
            except (RuntimeError, KeyError) as exc:
                raise CheckpointError(
                    f"{found / WEIGHTS}: weights do not fit the model in config.json ({exc})"
                ) from None
        else:
            load_weights(found, self.module)
        if self.asked_precision == "auto" and state.get("precision") not in (None, self.config.precision):
            self.config = self.config.replace(precision=state["precision"])  # the run's, measured then
        if state.get("accel") and accel.recorded(self.module) is not None:
            accel.apply(self.module, choices=state["accel"])  # the same kernels as before the stop
        try:
            distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            self.state = TrainState(**state["trainer"])
            _set_rng_state(state["rng"])  # checked here; set below for this rank
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise CheckpointError(
                f"{found / STATE}: the trainer state does not fit this run ({type(exc).__name__}: {exc})"
            ) from None
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
        if w.is_main:  # the checkpoint's history is the log up to it; later records are logged again
            run_dir.rewrite_log(self.out_dir, self.state.history)
        self._saved_at = (self.state.step, len(self.state.history))
        return True

    def _log(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if not self.world.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")  # one write: a crash leaves at most a partial last line

    # --- the loop ----------------------------------------------------------------------------------
    def _time_up(self) -> bool:
        c = self.config
        return c.max_time is not None and self.state.train_time >= c.max_time

    def _should_stop(self) -> bool:
        """Between steps. With several ranks the time limit is decided on rank 0 and agreed on in the next
        step (ranks measure different times; all must take the same number of steps)."""
        c, s = self.config, self.state
        if c.max_steps is not None and s.step >= c.max_steps:
            self._settle()  # the last step may have been skipped
            if s.step >= c.max_steps:
                return True
        return self._stop_agreed if self.world.distributed else self._time_up()

    def _due(self, every: int | None) -> bool:
        """Whether the step just taken is a multiple of `every`, once its non-finite flag is read."""
        if not every or self.state.step % every:
            return False
        self._settle()
        return self.state.step % every == 0

    def _settle(self, collective: bool = True) -> None:
        """Read the last step's non-finite flag (it waits for that step only; the current one's work may
        still be queued). A skipped step gives back its count and does not advance the schedule.
        `collective` False: this rank decides alone (an abrupt stop on one rank)."""
        if self._pending is None:
            return
        c, s, w = self.config, self.state, self.world
        self._critical = True  # the flag is consumed and the counters change together, or not at all
        try:
            skipped = self._pending.read()
            if c.precision == "fp16" and collective:  # the loss flag of this rank; every rank must agree
                (skipped_any,) = distributed.sum_on_host(w, [float(skipped)])
                skipped = skipped_any > 0
            if skipped:
                s.step -= 1
                s.nonfinite_skips += 1
            else:
                self.scheduler.step()
            self._pending = None
        finally:
            self._critical = False
        if not skipped:
            return
        lr = self.scheduler.get_last_lr()[0]
        if s.nonfinite_skips > c.max_nonfinite_skips:
            last = run_dir.latest(self.out_dir) if w.is_main else None
            raise FloatingPointError(
                f"training stopped at step {s.step + 1}: {s.nonfinite_skips} steps had a non-finite gradient "
                f"(NaN or inf), more than train.max_nonfinite_skips = {c.max_nonfinite_skips}; lower the "
                f"learning rate (now {lr:.3g}), set train.clip_norm, or check the data. Nothing non-finite "
                f"was saved; the last checkpoint is {last or 'none yet'}"
            )
        if w.is_main:
            tqdm.write(
                f"step {s.step + 1}: the gradient is not finite (NaN or inf); step skipped "
                f"({s.nonfinite_skips} of at most train.max_nonfinite_skips = {c.max_nonfinite_skips})",
                file=sys.stderr,
            )

    def evaluate(self) -> dict[str, Any]:
        """Evaluate on rank 0 (on every rank under FSDP, whose forward needs all of them); the others
        record the evaluation's place without metrics."""
        self._settle()
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
        """Train until `epochs`, `max_steps` or `max_time`; evaluate each `eval_every_epochs`; checkpoint
        then, every `save_every_steps` and at the end.

        Ctrl-C or SIGTERM saves a checkpoint at the current step before stopping (raising `Interrupted`),
        so `--resume` loses nothing; a second one stops at once, saving only if no update is uncounted.
        """
        c, s, w = self.config, self.state, self.world
        if w.is_main:
            self._hold_out_dir()
            try:
                if not self._resumed:
                    run_dir.claim(
                        self.out_dir,
                        command=self.command,
                        resume=False,
                        overwrite=self.overwrite,
                        rerun=self.rerun,
                    )
                run_dir.check_room(self.out_dir, self._checkpoint_bytes())
            except BaseException:
                self._release_out_dir()
                raise
        distributed.barrier(w)
        if s.step == 0 and s.batch_in_epoch == 0 and s.epoch == 0:
            _seed_all(c.seed + w.rank)  # rank 0 (and a single process) draws from `seed`
        # Ctrl-C / SIGTERM only set a flag; the loop stops between steps, so the checkpoint never holds
        # weights updated by a step it has not counted.
        previous = {}
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop()
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else (self._signal or signal.SIGINT)
            name = signal.Signals(signum).name
            if self._updating:  # stopped between an update and its count: that state must not be saved
                if w.is_main:
                    print(
                        f"\n{name} again: stopped at once inside step {s.step + 1}, not saved; the last "
                        f"checkpoint ({run_dir.latest(self.out_dir) or 'none yet'}) is kept",
                        file=sys.stderr,
                    )
                raise Interrupted(signum) from None
            # Agreed between steps: every rank saves together; a second Ctrl-C on one rank: no collectives.
            collective = self._interrupt_agreed or not w.distributed
            self.save(collective=collective)
            saved = w.is_main and (collective or not distributed.is_sharded(self.model))
            if saved:
                print(
                    f"\n{name}: checkpoint saved at step {s.step} in {self.checkpoint_dir}",
                    file=sys.stderr,
                )
            elif w.is_main:
                print(
                    f"\n{name} again: stopped at once; a sharded (FSDP) model cannot be saved by one rank",
                    file=sys.stderr,
                )
            raise Interrupted(signum, self.checkpoint_dir if saved else None) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release_out_dir()
        return s.history

    def _hold_out_dir(self) -> None:
        if self._lock is None:
            self._lock = run_dir.lock(self.out_dir)

    def _release_out_dir(self) -> None:
        run_dir.unlock(self._lock)
        self._lock = None

    def _autocast(self) -> Any:
        """bfloat16 / float16 autocast for the forward pass when `precision` asks (weights and optimiser
        stay float32); a no-op context for fp32."""
        precision = self.config.precision
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.world.device.type, dtype=dtype, enabled=precision != "fp32")

    def _confirm_auto(self, batch: Any) -> None:
        """precision "auto" resolved to bf16 by the product rule: keep it only where this model's step
        measures faster in bf16 (accel/precision.py), on a CPU, one process (under torchrun, DDP's
        collectives would take part in the timing: rank 0's product rule stands there). The timing runs
        forward and backward on `batch` with the random streams forked and the buffers (batch-norm
        statistics) restored; no optimiser step: the run starts as if it had not happened."""
        if self.world.device.type != "cpu" or self.world.distributed:
            return
        model = self.module
        buffers = [(b, b.detach().clone()) for b in model.buffers()]

        def step(precision: str) -> None:
            with torch.random.fork_rng(devices=[]):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    total = self.task.loss(model, batch)[0]
                total.backward()
            model.zero_grad(set_to_none=True)

        n_params = sum(p.numel() for p in model.parameters())
        try:
            chosen, why = confirm_by_step((type(model).__name__, n_params), step)
        finally:
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        if self.world.is_main:
            print(f"precision: auto -> {chosen} ({why})", file=sys.stderr)
        self.config = self.config.replace(precision=chosen)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._interrupted:  # a second signal: stop now, unless the counters are half-changed
            if self._critical or self._updating:
                self._deferred = signum  # raised as soon as the step is counted (_loop)
                return
            raise Interrupted(signum)
        self._interrupted, self._signal = True, signum
        print(f"\n{name}: stopping after this step ({name} again to stop at once) ...", file=sys.stderr)

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
            if self._confirm and s.step == 0 and s.batch_in_epoch == 0 and not self._resumed:
                self._confirm_auto(batches[w.rank * c.accumulate])
            self._confirm = False
            window_loss: float | torch.Tensor = 0.0
            window_count: int | torch.Tensor = 0
            window_tokens, window_time = 0, 0.0
            while s.batch_in_epoch + per_step <= len(batches) and not self._should_stop():
                if self._interrupted and (self._interrupt_agreed or not w.distributed):
                    raise Interrupted(self._signal or signal.SIGINT)
                t0 = time.perf_counter()
                self._step_rng = _rng_state()
                first = s.batch_in_epoch + w.rank * c.accumulate
                loss_value, n_count, n_tokens = self._step(batches[first : first + c.accumulate])
                dt = time.perf_counter() - t0
                s.train_time += dt
                s.batch_in_epoch += per_step
                s.step += 1  # counted now; given back by _settle if the step turns out skipped
                self._updating, self._step_rng = False, None
                if self._deferred:  # a second signal during the update: the step is counted now
                    raise Interrupted(self._deferred)
                window_loss = window_loss + loss_value
                window_count = window_count + n_count
                window_tokens += n_tokens
                window_time += dt
                bar.update(1)
                if self._due(c.log_every):
                    lr = self.scheduler.get_last_lr()[0]
                    # Sums over ranks: the loss of the global batches (skipped steps left out).
                    total, count, tokens = distributed.sum_on_host(
                        w, [float(window_loss), float(window_count), window_tokens]
                    )
                    tps = tokens / max(window_time, 1e-9)
                    record: dict[str, Any] = {"type": "train", "step": s.step, "epoch": s.epoch}
                    if count > 0:
                        record["loss"] = total / count
                        bar.set_postfix(loss=f"{total / count:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                    record.update(lr=lr, tokens_per_s=tps, time=s.train_time, peak_rss_bytes=peak_rss_bytes())
                    if s.nonfinite_skips:
                        record["nonfinite_skips"] = s.nonfinite_skips
                    self._log(record)
                    window_loss, window_count, window_tokens, window_time = 0.0, 0, 0, 0.0
                epoch_ends = s.batch_in_epoch + per_step > len(batches)
                if self._due(c.eval_every_steps) and not epoch_ends:
                    self._report(self.evaluate())
                epoch_saves = epoch_ends and (
                    (s.epoch + 1) % c.eval_every_epochs == 0 or s.epoch + 1 == c.epochs
                )
                last = c.max_steps is not None and s.step >= c.max_steps  # evaluated and saved below
                if self._due(c.save_every_steps) and not (epoch_saves or last):
                    self.save()
            bar.close()
            if s.batch_in_epoch + per_step > len(batches):
                s.epoch += 1
                s.batch_in_epoch = 0
                if s.epoch % c.eval_every_epochs == 0 or s.epoch == c.epochs:
                    self._report(self.evaluate())
                    self.save()
        self._settle()
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

    def _step(self, batches: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimiser step over this rank's `accumulate` batches. Returns this rank's summed loss and
        item count (both 0 when the step is skipped as non-finite) and its token count.

        The gradient is that of sum(summed losses) / N, N the items of the whole global batch (all ranks,
        all micro-batches), as one process would compute it. N is known only after every forward, so each
        micro-batch's loss is divided by `scale` (the same on every rank, about N / world size) and the
        gradient multiplied by world size x scale / N at the end (DDP and FSDP average over ranks).
        """
        if not self.module.training:  # evaluation switched it off; train() walks every module: only then
            self.model.train()  # (through a DDP wrapper, whose own flag evaluation of the module leaves alone)
        w, c = self.world, self.config
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum: torch.Tensor = torch.zeros((), device=w.device)
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
            loss_sum = loss_sum + total.detach().float()
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
        params = [p for p in self.model.parameters() if p.grad is not None]
        if factor != 1.0:
            for p in params:
                p.grad.mul_(factor)  # type: ignore[union-attr]
        # clip_norm None or 0: no clipping, but the norm still tells whether the step is finite
        norm = torch.nn.utils.clip_grad_norm_(params, c.clip_norm) if c.clip_norm else _total_norm(params)
        # Non-finite: the all-reduced gradient's norm (every rank agrees); under float16 the scaler owns
        # gradient overflow, and a non-finite loss is the sign of divergence.
        skip = ~torch.isfinite(loss_sum) if c.precision == "fp16" else ~torch.isfinite(norm)
        self._settle()  # the previous step's flag: its work is done or queued ahead of this one's
        self._updating = True
        if c.precision == "fp16":
            self.scaler.step(self.optimizer)  # skips the update when float16 gradients overflowed
        elif self._mask_on_device:
            self.optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
            self.optimizer.step()  # the fused kernel leaves parameters, moments and step as they were
        elif not bool(skip.item()):  # other optimisers cannot skip on the device: decide on the host
            self.optimizer.step()
        self.scaler.update()
        self._pending = _Flag(skip)  # the scheduler steps once the flag is read (_settle)
        zero = torch.zeros((), device=loss_sum.device)
        return torch.where(skip, zero, loss_sum), torch.where(skip, zero, float(items)), tokens


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


class _Flag:
    """A step's non-finite flag, read later without waiting for work queued after it: on CUDA it is copied
    to pinned host memory behind an event, so reading waits for that step only, not for the stream."""

    def __init__(self, flag: torch.Tensor) -> None:
        self.event: Any = None
        if flag.device.type == "cuda":
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flag

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host.item())


def _total_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of the gradients of `params` (all have one) together, on their device (no host sync;
    sharded gradients too)."""
    if not params:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm([p.grad for p in params])  # type: ignore[misc]
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))  # max_norm inf: multiplies by 1


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
