"""torch.distributed in one place: the process group from torchrun's environment, DDP / FSDP wrapping,
full (unsharded) state dicts for checkpoints, host-side agreement between ranks, and the torchrun launcher.

Nothing else in tformer imports torch.distributed. A process started without torchrun (no WORLD_SIZE in
its environment and no process group made by the caller) is a world of one: every helper here is then a
no-op, so single-process training runs exactly the code it ran before.

Backends: nccl when the processes train on CUDA GPUs, gloo on CPU. Counts, flags and times that ranks
must agree on travel over a gloo group on the host (the default group under gloo, a second one under
nccl), so agreeing on them never waits for the GPU.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from torch.distributed.checkpoint.state_dict import StateDictOptions, ValueType
    from torch.distributed.fsdp import FSDPModule

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # the gloo group for host-side agreement (None: the default group, or no group)
    host_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but torch sees no CUDA GPU (use 'auto' or 'cpu')")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
            "start at most that many processes per node (or set train.device = 'cpu')"
        )
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> World:
    """The world this process trains in. Under torchrun (WORLD_SIZE set) the default process group is
    made here if the caller has not made one: nccl for CUDA devices, gloo for CPU."""
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        return World(device=_device(device, 0))
    where = _device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        backend = "nccl" if where.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=where if where.type == "cuda" else None)
    global _HOST_GROUP
    if dist.get_backend() != "gloo" and _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")  # made once per process (a collective call)
    return World(rank, size, local_rank, where, _HOST_GROUP if dist.get_backend() != "gloo" else None)


_HOST_GROUP: dist.ProcessGroup | None = None


def sum_on_host(world: World, values: Sequence[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, on the host)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, group=world.host_group)
    return t.tolist()


def gather_objects(world: World, obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [obj] * world.size  # every item replaced by the gather
    dist.all_gather_object(out, obj, group=world.host_group)
    return out


def from_rank0(world: World, obj: T) -> T:
    """Rank 0's `obj` (a string or other small picklable value), on every rank."""
    if not world.distributed:
        return obj
    return gather_objects(world, obj)[0]


def check_same(world: World, value: object, what: str) -> None:
    """Raise if ranks disagree on `value` (e.g. a digest of the vocabularies each rank built)."""
    values = gather_objects(world, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"the {world.size} processes disagree on {what}; every rank must build the same")


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier(group=world.host_group)


# --- wrapping ------------------------------------------------------------------------------------------
def _layers(model: nn.Module) -> list[nn.Module]:
    """The layers that become FSDP units of their own: every self-attention stack's layers. A Seq2Seq's
    decoder layers stay in the root unit, because incremental decoding reaches into their cross-attention
    (`start_cache` calls `cross_attn.project_kv`) outside any forward that FSDP could gather around."""
    from tformer.layers import EncoderLayer

    return [m for m in model.modules() if isinstance(m, EncoderLayer)]


# Model methods other than forward that training and evaluation call (FSDP2 gathers parameters around
# forward only, unless told of the others).
_FORWARD_METHODS = ("encode", "decode", "start_cache", "decode_step", "probabilities")


def wrap(model: nn.Module, world: World, parallel: str) -> nn.Module:
    """The module to train: `model` itself in a world of one; DistributedDataParallel (replicas, gradients
    averaged in buckets during backward) or FSDP2's `fully_shard` (parameters, gradients and optimiser
    state sharded per transformer layer, gathered for each layer's forward and backward).

    FSDP2 changes `model` in place (its parameters become sharded DTensors); DDP returns a wrapper around
    it. Every rank must hold the same initial weights (DDP broadcasts rank 0's; FSDP needs the same seed).
    """
    if not world.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        # tformer's buffers are constants (position tables): no need to broadcast them at every forward.
        quiet = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        if quiet:
            return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in _layers(model):
        fully_shard(layer)
    fully_shard(model)  # the rest: embeddings, positions, final norm, output (tied weights stay together)
    for name in _FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The tformer model inside a DDP wrapper (FSDP2 keeps the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> TypeGuard[FSDPModule]:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> AbstractContextManager[None]:
    """A context for one accumulation micro-batch: gradients are all-reduced (DDP) / reduce-scattered
    (FSDP) only on the last one; the others accumulate locally (`no_sync`)."""
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


# --- full state dicts for checkpoints -------------------------------------------------------------------
def _options(*, cpu_offload: bool = False, strict: bool = True) -> StateDictOptions:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, strict=strict)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU, on rank 0 (a collective under FSDP: call on every rank). Names are
    the tformer model's own; tied weights share one tensor, as in `model.state_dict()`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    inner = unwrap(model)
    gathered = get_model_state_dict(inner, options=_options(cpu_offload=True))
    # Own storage per tensor (a gathered one may view a larger buffer), then re-tie the names that share
    # one parameter in the model (gathering copies each name separately).
    state: dict[str, torch.Tensor] = {}
    for k, v in gathered.items():
        assert isinstance(v, torch.Tensor)  # full_state_dict: plain tensors (no sharded value)
        state[k] = v.clone()
    first: dict[int, str] = {}
    for name, p in inner.named_parameters(remove_duplicate=False):
        if id(p) in first and first[id(p)] in state:
            state[name] = state[first[id(p)]]
        first.setdefault(id(p), name)
    return state


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights (every rank passes the same) into a plain, DDP or FSDP model, strictly. Weights
    saved by tformer <= 0.2 (a cross-attention's one in_proj) are split as the model now holds them."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from tformer.attention.multihead import legacy_cross_names, split_legacy_rows
    from tformer.models.legacy import upgrade_names

    inner = unwrap(model)
    state = split_legacy_rows(upgrade_names(state, inner), legacy_cross_names(inner))
    first: dict[int, str] = {}
    for name, p in inner.named_parameters(remove_duplicate=False):  # a tied name stored once: fill it in
        if name not in state and id(p) in first and first[id(p)] in state:
            state = {**state, name: state[first[id(p)]]}
        first.setdefault(id(p), name)
    full: dict[str, ValueType] = dict(state)
    set_model_state_dict(inner, full, options=_options(strict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimiser state keyed by parameter name (not position), unsharded, on CPU: the same format at every
    world size and for DDP and FSDP, so a checkpoint resumes under any of them. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    legacy = any(isinstance(k, int) for k in state.get("state", {}))  # optimizer.state_dict() format
    if legacy:
        if is_sharded(model):
            raise ValueError(
                "this checkpoint's optimiser state predates distributed training; resume it with "
                "train.parallel = 'ddp' (or one process) once, then FSDP can read the next checkpoint"
            )
        optimizer.load_state_dict(state)
        return
    from tformer.attention.multihead import legacy_cross_names, split_legacy_rows
    from tformer.models.legacy import renamer

    # names of an earlier module layout (decoder_layers.N.* -> decoder.layers.N.*; models/legacy.py)
    rename = renamer(unwrap(model))
    state = {
        **state,
        "state": {rename(k): v for k, v in state.get("state", {}).items()},
        "param_groups": [
            {**g, "params": [rename(p) for p in g["params"]]} for g in state.get("param_groups", [])
        ],
    }
    old = legacy_cross_names(unwrap(model))
    if any(name in old for name in state.get("state", {})):  # saved by tformer <= 0.2 (one cross in_proj)
        groups = [
            {**g, "params": [n for p in g["params"] for n in (old[p][:2] if p in old else (p,))]}
            for g in state.get("param_groups", [])
        ]
        state = {**state, "state": split_legacy_rows(state["state"], old), "param_groups": groups}
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=_options())


# --- launching ------------------------------------------------------------------------------------------
def without_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` less `option VALUE` / `option=VALUE` (what the launched processes must not see again)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m tformer ARGV` in `nproc` processes under torchrun (torch.distributed.run) on this
    machine; return its exit status."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "tformer",
        *argv,
    ]
    return subprocess.call(cmd)
