"""One training loop for every task: Adam, schedule, clipping, evaluation, progress, logs, checkpoints.

Here: the loop (epochs, steps, when to log, evaluate and save), one optimiser step over the rank's
micro-batches, and the stop on Ctrl-C / SIGTERM. What the trainer and a task agree on, and why resuming is
exact: state.py. The counters, evaluation, the log and checkpoints: run.py (TrainingRun, which Trainer
extends) with snapshot.py. The step's mechanics (the optimiser, clipping, the non-finite skip on the
device): step.py. Precision and autocast: autocast.py.

Several processes (torchrun; see `distributed.py`): one optimiser step takes the next `world size x
accumulate` batches of the epoch's list, rank r the r-th group of `accumulate` of them, so a step's global
batch does not depend on how it is split. The loss of a step is the sum of every batch's summed loss over
the global count of items (tokens, examples), exactly as one process would compute it over the same
batches. Positions in the checkpoint are global (steps, batches of the epoch), so it resumes at any world
size. Only rank 0 logs, shows progress and writes checkpoints.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import torch
from tqdm.auto import tqdm

from tformer import accel
from tformer.accel.precision import confirm_by_step
from tformer.accel.precision import resolve as resolve_precision
from tformer.config import ConfigError, TrainConfig
from tformer.memory import peak_rss_bytes
from tformer.models.checkpointing import set_activation_checkpointing
from tformer.training import compiling, distributed, lora, run_dir
from tformer.training.autocast import autocast, check_precision, confirm_on_step
from tformer.training.logsinks import training_bar
from tformer.training.run import TrainingRun
from tformer.training.schedules import make_scheduler, peak_lr
from tformer.training.snapshot import checkpoint_bytes
from tformer.training.state import (
    BatchT,
    Interrupted,
    LogRecord,
    LossValue,
    Task,
    TrainState,
    rng_state,
    seed_all,
)
from tformer.training.step import NonfiniteFlag, make_optimizer, scaled_clipped_norm, update

__all__ = ["Interrupted", "LossValue", "Task", "TrainState", "Trainer", "make_optimizer"]


class Trainer(TrainingRun[BatchT]):
    """The loop that advances a TrainingRun (run.py: counters, evaluation, log, checkpoints)."""

    def __init__(
        self,
        model: torch.nn.Module,
        task: Task[BatchT],
        config: TrainConfig,
        *,
        out_dir: str | Path,
        progress: bool = True,
        extra_config: dict[str, object] | None = None,
        command: str = "train",
        overwrite: bool = False,
        rerun: bool = False,
    ) -> None:
        """`command`, `overwrite`, `rerun`: who owns `out_dir` (run_dir.claim): a fresh `fit` into a
        directory another run wrote needs `overwrite`, or `rerun` when the same command wrote it."""
        world = distributed.setup(config.device)
        # "auto" becomes what this machine runs fastest (accel/precision.py): config.json records that
        resolved, why = resolve_precision(config.precision, world.device)
        if config.precision == "auto":
            if world.distributed:  # every rank computes alike: rank 0's measurement
                resolved = distributed.from_rank0(world, resolved)
            if world.is_main:
                print(f"precision: auto -> {resolved} ({why})", file=sys.stderr)
        # the product rule's bf16 is confirmed on the model's own step before the first one (_confirm_auto)
        self._confirm = config.precision == "auto" and resolved == "bf16"
        # "auto" compile is decided after the run's second step (_decide_compile)
        c = config.replace(precision=resolved)
        check_precision(c, world)
        module = model.to(world.device)  # the tformer model: evaluation, config, checkpoints
        # recompute each Transformer layer in backward (models/checkpointing.py); set before compile / DDP
        if not set_activation_checkpointing(model, c.checkpoint_activations) and c.checkpoint_activations:
            raise ConfigError(
                f"train.checkpoint_activations = true, but the model ({type(model).__name__}) has no "
                "Transformer layers to recompute (the RNN and CNN baselines keep theirs); set it to false"
            )
        d_model: int = getattr(model, "config").d_model  # noqa: B009  (every tformer model has a config)
        peak = peak_lr(c.lr, d_model, c.warmup_steps)
        if c.compile is True:
            # in place: the module, its state dict and names stay (compiling.py)
            compiling.compile_steps(model)
        if world.distributed:  # the kernels of training products: rank 0's choices on every rank
            accel.agree(model, lambda _name, winner: distributed.from_rank0(world, winner))
        wrapped = distributed.wrap(model, world, c.parallel)  # what training steps call
        optimizer = make_optimizer(wrapped, c, peak, fused=not distributed.is_sharded(wrapped))
        super().__init__(
            world=world,
            task=task,
            config=c,
            asked_precision=config.precision,
            asked_compile=config.compile,
            module=module,
            model=wrapped,
            optimizer=optimizer,
            scheduler=make_scheduler(
                optimizer, c.schedule, warmup=c.warmup_steps, total=c.max_steps, min_lr=c.min_lr, peak=peak
            ),
            # float16 needs its loss scaled so small gradients survive; a no-op for fp32 / bf16.
            scaler=torch.amp.GradScaler(world.device.type, enabled=c.precision == "fp16"),
            out_dir=Path(out_dir),
            progress=progress and world.is_main,
            command=command,
            extra_config=extra_config or {},
        )
        self.overwrite, self.rerun = overwrite, rerun
        # The fused AdamW skips its update on the device when told a step was not finite (found_inf).
        self._mask_on_device = bool(optimizer.defaults.get("fused")) and c.precision != "fp16"
        self._updating = False  # an optimiser update the step counter has not counted yet
        self._deferred = 0  # a second signal that arrived in a critical region (_critical)
        self._signal = 0  # the signal this process received (SIGINT / SIGTERM)
        self._interrupted = False  # Ctrl-C / SIGTERM seen by this process
        self._interrupt_agreed = False  # ... because one of them was interrupted

    def fit(self) -> list[LogRecord]:
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
                run_dir.check_room(self.out_dir, checkpoint_bytes(self.module))
            except BaseException:
                self._release_out_dir()
                raise
        distributed.barrier(w)
        if self.adapter_only and not s.history:  # LoRA: the trainable share is a fresh run's first record
            trainable, total = lora.counts(self.module)
            self._log(
                {
                    "type": "lora",
                    "step": 0,
                    "trainable_parameters": trainable,
                    "parameters": total,
                    "trainable_share": trainable / total,
                }
            )
        if s.step == 0 and s.batch_in_epoch == 0 and s.epoch == 0:
            seed_all(c.seed + w.rank)  # rank 0 (and a single process) draws from `seed`
        # Ctrl-C / SIGTERM only set a flag; the loop stops between steps, so the checkpoint never holds
        # weights updated by a step it has not counted.
        previous = {}
        if threading.current_thread() is threading.main_thread():
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

    def _confirm_auto(self, batch: BatchT) -> None:
        """precision "auto" resolved to bf16 by the product rule: keep it only where this model's step
        measures faster in bf16 (accel/precision.py), on a CPU, one process (under torchrun, DDP's
        collectives would take part in the timing: rank 0's product rule stands there). No optimiser step:
        the run starts as if the timing had not happened (autocast.confirm_on_step)."""
        if self.world.device.type != "cpu" or self.world.distributed:
            return
        chosen, why = confirm_on_step(
            self.module, lambda: self.task.loss(self.module, batch).total, confirm_by_step
        )
        if self.world.is_main:
            print(f"precision: auto -> {chosen} ({why})", file=sys.stderr)
        self.config = self.config.replace(precision=chosen)

    def _decide_compile(self, batches: list[BatchT], step_s: float) -> None:
        """train.compile = "auto", after the second step: compile the rest of the run's steps or not
        (training/compiling.py); the seconds a measurement takes count as training time."""
        c, s, w = self.config, self.state, self.world
        per_step = w.size * c.accumulate
        planned = (len(batches) // per_step) * c.epochs
        if c.max_steps is not None:
            planned = min(planned, c.max_steps)
        remaining = max(0, planned - s.step) * step_s
        if c.max_time is not None:
            remaining = min(remaining, max(0.0, c.max_time - s.train_time))
        one = batches[w.rank * c.accumulate]
        timed = remaining >= compiling.rule.MIN_RUN_S  # a short run: nothing timed, not even the clock read
        t0 = time.perf_counter() if timed else 0.0
        chosen, why = compiling.decide(
            self.module,
            lambda: self.task.loss(self.module, one).total,
            precision=c.precision,
            device=w.device,
            distributed=w.distributed,
            batches=batches,
            step_s=step_s,
            remaining_s=remaining,
            tuner=accel.tuner(),
        )
        if w.distributed:  # every rank compiles alike: rank 0's verdict
            chosen = distributed.from_rank0(w, chosen)
        if chosen:
            compiling.compile_steps(self.module)
        self.config = self.config.replace(compile=chosen)
        if timed:
            s.train_time += time.perf_counter() - t0
        if w.is_main:
            tqdm.write(f"compile: auto -> {'compiled' if chosen else 'eager'} ({why})", file=sys.stderr)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
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
            bar = training_bar(
                total=len(batches) // per_step,
                initial=s.batch_in_epoch // per_step,
                desc=f"epoch {s.epoch + 1}/{c.epochs}",
                enabled=self.progress,
            )
            fresh = s.step == 0 and s.batch_in_epoch == 0 and not self._resumed
            if self._confirm and fresh:
                self._confirm_auto(batches[w.rank * c.accumulate])
            self._confirm = False
            window_loss: float | torch.Tensor = 0.0
            window_count: int | torch.Tensor = 0
            window_tokens, window_time = 0, 0.0
            while s.batch_in_epoch + per_step <= len(batches) and not self._should_stop():
                if self._interrupted and (self._interrupt_agreed or not w.distributed):
                    raise Interrupted(self._signal or signal.SIGINT)
                t0 = time.perf_counter()
                self._step_rng = rng_state()
                first = s.batch_in_epoch + w.rank * c.accumulate
                loss_value, n_count, n_tokens = self._step(batches[first : first + c.accumulate])
                dt = time.perf_counter() - t0
                s.train_time += dt
                s.batch_in_epoch += per_step
                s.step += 1  # counted now; given back by _settle if the step turns out skipped
                self._updating, self._step_rng = False, None
                if self._deferred:  # a second signal during the update: the step is counted now
                    raise Interrupted(self._deferred)
                if s.step == 2 and self.config.compile == "auto":  # (a resumed run keeps its decision)
                    self._decide_compile(batches, dt)
                window_loss = window_loss + loss_value
                window_count = window_count + n_count
                window_tokens += n_tokens
                window_time += dt
                bar.update(1)
                if self._due(c.log_every):
                    lr = float(self.scheduler.get_last_lr()[0])
                    # Sums over ranks: the loss of the global batches (skipped steps left out).
                    total, count, tokens = distributed.sum_on_host(
                        w, [float(window_loss), float(window_count), window_tokens]
                    )
                    tps = tokens / max(window_time, 1e-9)
                    record: LogRecord = {"type": "train", "step": s.step, "epoch": s.epoch}
                    if count > 0:
                        record["loss"] = total / count
                        bar.set_postfix(loss=f"{total / count:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                    record.update(lr=lr, tokens_per_s=tps, time=s.train_time, peak_rss_bytes=peak_rss_bytes())
                    if self.grad_norm is not None:  # the window's last step (before clipping)
                        record["grad_norm"] = float(self.grad_norm)
                    if s.nonfinite_skips:
                        record["nonfinite_skips"] = s.nonfinite_skips
                    if s.overflow_skips:
                        record["overflow_skips"] = s.overflow_skips
                    self._log(record)
                    window_loss, window_count, window_tokens, window_time = 0.0, 0, 0, 0.0
                epoch_ends = s.batch_in_epoch + per_step > len(batches)
                if self._due(c.eval_every_steps) and not epoch_ends:
                    self._report(self.evaluate())
                    if self.best_due:  # a new best (train.keep_best) is saved at once
                        self.save()
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

    def _step(self, batches: list[BatchT]) -> tuple[torch.Tensor, torch.Tensor, int]:
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
                with autocast(c.precision, w.device):
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
        # clip_norm None or 0: no clipping, but the norm still tells whether the step is finite
        norm = scaled_clipped_norm(self.model, w.size * scale / max(1.0, n_global), c.clip_norm)
        self.grad_norm = norm.detach()
        # Non-finite: the all-reduced gradient's norm (every rank agrees); under float16 the scaler owns
        # gradient overflow, and a non-finite loss is the sign of divergence.
        fp16 = c.precision == "fp16"
        skip = ~torch.isfinite(loss_sum) if fp16 else ~torch.isfinite(norm)
        # float16: unscaled gradients that are not finite are the scaler's overflow; it skips that update
        overflow = ~torch.isfinite(norm) if fp16 else None
        self._settle()  # the previous step's flag: its work is done or queued ahead of this one's
        self._updating = True
        update(self.optimizer, self.scaler, skip, fp16=fp16, mask_on_device=self._mask_on_device)
        self._pending = NonfiniteFlag(skip, overflow)  # the scheduler steps once the flag is read (_settle)
        zero = torch.zeros((), device=loss_sum.device)
        return torch.where(skip, zero, loss_sum), torch.where(skip, zero, float(items)), tokens
