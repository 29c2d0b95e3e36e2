"""A training run's state and records, apart from the loop that advances it (trainer.py): the step
counter and its non-finite accounting (a step is counted when taken and given back when its flag, read a
step later, says it was skipped: _settle), evaluation, the JSONL log, and the checkpoint: save from rank 0
(full weights, optimiser state keyed by parameter name: it resumes at any world size) and resume, under
the run directory's lock (run_dir.py)."""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Generic

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from tformer.config import ConfigError, TrainConfig
from tformer.config.run import BEST_METRICS, best_metric_lower
from tformer.training import compiling, distributed, lora, run_dir
from tformer.training.average import average_checkpoints
from tformer.training.checkpoint import write_checkpoint
from tformer.training.ema import EMA, EMA_WEIGHTS
from tformer.training.logsinks import TensorBoardLog, attention_picture
from tformer.training.schedules import budget_cosine
from tformer.training.snapshot import check_finite, restore, trainer_state
from tformer.training.state import BatchT, LogRecord, Task, TrainState, rng_state
from tformer.training.step import NonfiniteFlag, SkippingAdamW


class TrainingRun(Generic[BatchT]):
    """A run's model, optimiser, schedule, counters and files; Trainer (trainer.py) builds it and runs
    the loop. Only rank 0 logs and writes."""

    def __init__(
        self,
        *,
        world: distributed.World,
        task: Task[BatchT],
        config: TrainConfig,
        asked_precision: str,
        asked_compile: bool | str,
        module: torch.nn.Module,
        model: torch.nn.Module,
        optimizer: SkippingAdamW,
        scheduler: LambdaLR,
        scaler: torch.amp.GradScaler,
        out_dir: Path,
        progress: bool,
        command: str,
        extra_config: dict[str, object],
    ) -> None:
        """`module`: the tformer model (evaluation, config, checkpoints); `model`: what training steps call
        (`module`, or its DDP / FSDP wrapper); `config`: with the precision resolved, `asked_precision` the
        configured one, `asked_compile` train.compile as configured ("auto" is decided after the second
        step); `progress`: this rank shows progress."""
        self.world, self.task, self.config, self.asked_precision = world, task, config, asked_precision
        self.asked_compile = asked_compile
        self.module, self.model = module, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.out_dir = out_dir
        self.checkpoint_dir = out_dir / run_dir.LATEST  # a link to the latest checkpoint-<step>/
        self.log_path = out_dir / run_dir.LOG
        self.progress, self.command = progress, command
        self.extra_config = extra_config  # more sections for config.json (e.g. the data config)
        self.state = TrainState()
        self._resumed = False  # resume() ran: out_dir is claimed
        self._pending: NonfiniteFlag | None = None  # the last step's non-finite flag, not yet read
        self._step_rng: dict[str, object] | None = None  # RNG states at the start of the running step
        self._critical = False  # counters being changed: a second signal waits for the end
        self._saved_at: tuple[int, int] | None = None  # (step, records) of the checkpoint on disk
        self._lock: int | None = None  # run_dir.lock on out_dir while this run trains (rank 0)
        self._stop_agreed = False  # every rank knows to stop after the current step
        self._tensorboard: TensorBoardLog | None = None  # train.log "tensorboard" (rank 0), opened on use
        self.grad_norm: torch.Tensor | None = None  # the last step's gradient norm (read when logged)
        self.best_due = False  # the last evaluation is a new best (train.keep_best): the next save marks it
        if config.ema is not None and distributed.is_sharded(model):
            raise ConfigError(
                f"train.ema = {config.ema} with train.parallel = 'fsdp': the moving average of sharded "
                "parameters is not kept; use train.parallel = 'ddp' (or no train.ema)"
            )
        # LoRA adapters (lora.py): the checkpoints hold only the trainable tensors
        self.adapter_only = lora.adapted(module) is not None
        if self.adapter_only and distributed.is_sharded(model):
            raise ConfigError(
                "train.lora_rank with train.parallel = 'fsdp': adapter checkpoints of sharded models are not "
                "written; use train.parallel = 'ddp' (the frozen base needs no sharded optimiser state)"
            )
        # train.ema: the weights' moving average (ema.py), kept on rank 0 (the one that evaluates and saves)
        self.ema = EMA(module, config.ema) if config.ema is not None and world.is_main else None

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
        check_finite(self.module, w, collective=collective, step=s.step, out_dir=self.out_dir)
        weights = distributed.full_model_state(self.model) if sharded else None
        if self.adapter_only:  # an adapter checkpoint: the trainable tensors only (lora.py)
            weights = lora.adapter_state(self.module)
        optimizer = distributed.full_optimizer_state(self.model, self.optimizer)
        # Stopped inside a step, before its update: the state is the step's start, RNG included.
        rng = self._step_rng or rng_state()
        rngs = distributed.gather_objects(w, rng) if collective else [rng]
        if w.is_main:
            state = trainer_state(
                optimizer=optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                state=s,
                rngs=rngs,
                world=w,
                config=self.config,
                module=self.module,
            )
            config = {**self.task.checkpoint_config(), "train": self.config.to_dict(), **self.extra_config}
            if self.adapter_only:  # the adapters' settings and their base (path, sha256)
                config["lora"] = lora.section(self.module)
            if self.ema is not None:
                state["ema"] = {"decay": self.ema.decay, "weights": EMA_WEIGHTS}  # resume reads that file
            write = partial(
                write_checkpoint,
                model=self.module,
                weights=weights,
                config=config,
                write_extra=self._write_files,
                trainer_state=state,
            )
            saved = run_dir.save(self.out_dir, step=s.step, keep=self.config.keep_checkpoints, write=write)
            metric = self.config.keep_best
            if self.best_due and metric is not None and s.best_value is not None:
                if metric.startswith("ema_"):  # the moving average scored best: its own checkpoint
                    target = run_dir.best_ema_path(self.out_dir, s.step)
                    saved = average_checkpoints([saved], target, ema=True, overwrite=True)
                run_dir.mark_best(self.out_dir, saved, metric=metric, value=s.best_value, step=s.step)
                run_dir.prune_best_ema(self.out_dir)
        self.best_due = False
        if collective:
            distributed.barrier(w)  # nobody reads a checkpoint rank 0 is still writing
        self._saved_at = (s.step, len(s.history))
        return self.checkpoint_dir

    def _write_files(self, directory: Path) -> None:
        """The task's files (tokenizers, labels) and, with train.ema, ema.safetensors."""
        self.task.write_files(directory)
        if self.ema is not None:
            self.ema.write(directory, self.module)

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
        self.state, self.config = restore(
            found,
            world=w,
            module=self.module,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            config=self.config,
            asked_precision=self.asked_precision,
            asked_compile=self.asked_compile,
            progress=self.progress,
        )
        if self.config.compile is True and not compiling.is_compiled(
            self.module
        ):  # the run's recorded "auto"
            compiling.compile_steps(self.module)
        if self.ema is not None and not self.ema.load(found, self.module):
            self.ema = EMA(self.module, self.ema.decay)  # the average starts from the resumed weights
            if self.progress:
                tqdm.write(f"note: {found} has no moving average of the weights; train.ema starts here")
        # Records logged after this checkpoint (a run killed before its next save) will be logged again.
        if w.is_main:  # the checkpoint's history is the log up to it; later records are logged again
            run_dir.rewrite_log(self.out_dir, self.state.history)
        self._saved_at = (self.state.step, len(self.state.history))
        return True

    def _log(self, record: LogRecord) -> None:
        self.state.history.append(record)
        if not self.world.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")  # one write: a crash leaves at most a partial last line
        board = self._board()
        if board is not None:
            board.record(record)

    def _board(self) -> TensorBoardLog | None:
        """The TensorBoard log where train.log asks for one (rank 0); a resumed run's drops the events
        after its checkpoint, as log.jsonl drops those records."""
        if "tensorboard" not in self.config.log or not self.world.is_main:
            return None
        if self._tensorboard is None:
            purge = self._saved_at[0] + 1 if self._resumed and self._saved_at is not None else None
            self._tensorboard = TensorBoardLog(self.out_dir / "tensorboard", purge_step=purge)
        return self._tensorboard

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
        if c.patience is not None and s.evals_since_best >= c.patience:
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
            skipped, overflowed = self._pending.read()
            if c.precision == "fp16" and collective:  # the loss flag of this rank; every rank must agree
                skipped_any, overflowed_any = distributed.sum_on_host(w, [float(skipped), float(overflowed)])
                skipped, overflowed = skipped_any > 0, overflowed_any > 0 and not skipped_any > 0
            if skipped:
                s.step -= 1
                s.nonfinite_skips += 1
            elif overflowed:  # the scaler left the weights as they were: no step, no schedule, no EMA update
                s.step -= 1
                s.overflow_skips += 1
            else:
                if collective:
                    self._size_schedule()
                self.scheduler.step()
                if self.ema is not None:  # the parameters are still this step's result (ema.py)
                    self.ema.update()
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

    def _size_schedule(self) -> None:
        """A cosine over train.max_time (no max_steps): its length in steps is predicted from the step
        rate once the warm-up is over (and 50 steps at least, so the first steps' start-up costs weigh
        little), and again at a few points of the decay (schedules.Cosine.size); rank 0's prediction, for
        every rank. The schedule's state (in the checkpoint) keeps it."""
        fn = budget_cosine(self.scheduler)
        c, s, w = self.config, self.state, self.world
        done = self.scheduler.last_epoch + 1  # the steps settled, the one being settled included
        if fn is None or c.max_time is None or done < 50:
            return
        before = fn.total
        sized = fn.size(done, s.train_time, c.max_time)  # when: the same on every rank (steps, progress)
        if sized and w.distributed:  # each rank measured its own time; rank 0's prediction it is
            fn.__dict__.update(distributed.from_rank0(w, dict(fn.__dict__)))
        if sized and self.progress and fn.total != before:
            tqdm.write(
                f"schedule: the cosine decay ends at step {fn.total} (step {done}, {s.train_time:.0f} s of "
                f"training; train.max_time = {c.max_time:g} s)"
            )

    def evaluate(self) -> LogRecord:
        """Evaluate on rank 0 (on every rank under FSDP, whose forward needs all of them); the others
        record the evaluation's place without metrics."""
        self._settle()
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.world.is_main or distributed.is_sharded(self.model):
            self.module.eval()
            with compiling.eager(self.module), torch.no_grad():  # a compiled run's steps only (compiling.py)
                metrics = self.task.evaluate(self.module)
                if self.ema is not None:  # the averaged weights, then the raw ones again, exactly
                    with self.ema.swapped_in(self.module):
                        metrics |= {f"ema_{k}": v for k, v in self.task.evaluate(self.module).items()}
        record: LogRecord = {
            "type": "eval",
            "step": self.state.step,
            "epoch": self.state.epoch,
            "time": self.state.train_time,
            **metrics,
            "eval_seconds": time.perf_counter() - t0,
        }
        self._log(record)
        self._track_best(record)
        board = self._board()
        draw = getattr(self.task, "attention_maps", None)  # the task's fixed validation example
        if board is not None and draw is not None:
            with compiling.eager(self.module), torch.no_grad():
                maps = draw(self.module)
            if maps is not None:
                board.image("attention", attention_picture(maps), self.state.step)
        return record

    def _track_best(self, record: LogRecord) -> None:
        """train.keep_best: is this evaluation a new best (rank 0 decides, every rank learns it)? Then the
        next save marks its checkpoint `best`; else one more evaluation without one (train.patience)."""
        c, s, w = self.config, self.state, self.world
        if c.keep_best is None:
            return
        value = record.get(c.keep_best)
        if w.is_main and not isinstance(value, (int, float)):
            recorded = ", ".join(k for k, v in record.items() if k.removeprefix("ema_") in BEST_METRICS)
            raise ConfigError(
                f"train.keep_best = {c.keep_best!r}, but this family's evaluation records "
                f"{recorded or 'none of the metrics keep_best takes'}"
            )
        improved = False
        if w.is_main and isinstance(value, (int, float)):
            lower = best_metric_lower(c.keep_best)
            best = s.best_value
            improved = best is None or (value < best if lower else value > best)
        improved = bool(distributed.from_rank0(w, improved)) if w.distributed else improved
        if improved:
            s.best_value = float(value) if isinstance(value, (int, float)) else s.best_value
            s.best_step, s.evals_since_best, self.best_due = s.step, 0, True
            return
        s.evals_since_best += 1
        if c.patience is not None and s.evals_since_best >= c.patience and w.is_main:
            tqdm.write(
                f"stopping: {c.keep_best} has not improved for {s.evals_since_best} evaluations "
                f"(train.patience = {c.patience}); the best, {s.best_value:.4g} at step {s.best_step}, is "
                f"kept as {self.out_dir / run_dir.BEST}",
                file=sys.stderr,
            )

    def _hold_out_dir(self) -> None:
        if self._lock is None:
            self._lock = run_dir.lock(self.out_dir)

    def _release_out_dir(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        run_dir.unlock(self._lock)
        self._lock = None

    def _report(self, record: LogRecord) -> None:
        if not self.progress:
            return
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in record.items()
            if k not in ("type",)
        )
        tqdm.write(f"eval: {shown}")
