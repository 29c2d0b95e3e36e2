"""A training run's checkpointed state besides the weights' files: what `Trainer.save` writes into
trainer_state (optimiser keyed by parameter name, schedule, scaler, counters, every rank's RNG states, the
resolved precision and kernels) and how `Trainer.resume` puts it back, at any world size; and the check
that no non-finite parameter is ever saved."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from tformer import accel
from tformer.config import TrainConfig
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
from tformer.training.state import TrainState, seed_all, set_rng_state


def check_finite(
    module: torch.nn.Module, world: distributed.World, *, collective: bool, step: int, out_dir: Path
) -> None:
    """Refuse to save parameters that are not finite (a weight can become NaN or inf while the loss
    is still finite); every rank checks its own (shards) and all agree unless not `collective`."""
    bad = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP shard
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad.append(name)
    (n_bad,) = distributed.sum_on_host(world, [len(bad)]) if collective else [len(bad)]
    if n_bad:
        last = run_dir.latest(out_dir)
        where = f"{bad[0]} and {len(bad) - 1} more" if len(bad) > 1 else (bad[0] if bad else "a shard")
        raise FloatingPointError(
            f"step {step}: parameters are not finite (NaN or inf: {where}); not saving them. "
            f"The last checkpoint ({last or 'none yet'}) is kept; lower train.lr or raise train.eps"
        )


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About the size of one checkpoint: the weights, Adam's two moments, 1 MiB for the rest."""
    n = sum(t.numel() * t.element_size() for t in {id(p): p for p in module.parameters()}.values())
    return 3 * n + 2**20


def trainer_state(
    *,
    optimizer: dict[str, object],
    scheduler: LambdaLR,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    rngs: list[dict[str, object]],
    world: distributed.World,
    config: TrainConfig,
    module: torch.nn.Module,
) -> dict[str, object]:
    """trainer_state's contents: `optimizer` the full name-keyed optimiser state, `rngs` every rank's."""
    return {
        "optimizer": optimizer,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "trainer": vars(state),
        "rng": rngs[0],
        "rng_ranks": rngs,
        "world_size": world.size,
        "accumulate": config.accumulate,
        "precision": config.precision,  # as resolved: a resumed "auto" run keeps it
        "compile": config.compile,  # likewise: whether the steps run compiled ("auto": not decided yet)
        "accel": accel.recorded(module),  # the kernels chosen per shape class (None: stock)
    }


def restore(
    found: Path,
    *,
    world: distributed.World,
    module: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    asked_precision: str,
    asked_compile: bool | str,
    progress: bool,
) -> tuple[TrainState, TrainConfig]:
    """Load the checkpoint `found` into `module` (through `model`, the FSDP-sharded one, where sharded),
    the optimiser, schedule and scaler, and set this rank's RNG streams. -> (the counters, `config` with
    the run's resolved precision and compile where "auto" was asked)."""
    state = load_trainer_state(found)  # first: a tformer 0.1 state is refused before anything loads
    require(state, found, "optimizer", "scheduler", "trainer", "rng")
    sharded = distributed.is_sharded(model)  # a flag, not a narrowing: `model` stays a Module
    if sharded:
        try:
            distributed.load_model_state(model, read_weights(found))
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"{found / WEIGHTS}: weights do not fit the model in config.json ({exc})"
            ) from None
    else:
        load_weights(found, module)
    if asked_precision == "auto" and state.get("precision") not in (None, config.precision):
        config = config.replace(precision=state["precision"])  # the run's, measured then
    if asked_compile == "auto":  # the run's decision (a checkpoint from before it was recorded: eager)
        config = config.replace(compile=state.get("compile", False))
    if state.get("accel") and accel.recorded(module) is not None:
        accel.apply(module, choices=state["accel"])  # the same kernels as before the stop
    try:
        distributed.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        counters = TrainState(**state["trainer"])
        set_rng_state(state["rng"])  # checked here; set below for this rank
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(
            f"{found / STATE}: the trainer state does not fit this run ({type(exc).__name__}: {exc})"
        ) from None
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == world.size:
        set_rng_state(ranks[world.rank])
    elif world.is_main:
        set_rng_state(state["rng"])
    else:  # a new world size: rank 0 continues its stream, the others start fresh ones
        seed_all(config.seed + world.rank + 1_000_003 * counters.step)
    before = state.get("world_size", 1) * state.get("accumulate", 1)
    now = world.size * config.accumulate
    if before != now and progress:
        tqdm.write(
            f"note: the checkpoint took {before} batches per step (processes x accumulate); this run takes {now}"
        )
    return counters, config
