"""torch.compile in a training run: which steps run compiled, and `train.compile = "auto"`'s decision.

Only the training steps run compiled. `Module.compile()` compiles every call of the module, so evaluation
(eval mode, no gradients, other batch shapes) and the decoding an evaluation does (one more key each step)
would each compile again, and dynamo gives up after a few shapes; `eager(module)` runs them uncompiled.

"auto" (accel/training.py holds the rule) is decided after the run's second step (the first pays for
accel's kernel choices and first allocations), on a CPU, where every batch of the epoch (but its last) has the same
shapes (varying shapes would compile again and again): the rest of the run is estimated from that step's
time, and from `MIN_RUN_S` on the model's forward and backward are timed eager and compiled on one batch,
on scratch (the random streams forked, gradients cleared and buffers restored after:
`autocast.scratch_steps`); the rest of the run is compiled where the compiled step won. A short run is
left as it is: nothing is timed and nothing compiled. The verdict is cached per machine, model and batch
shape; the seconds the decision takes count as training time (train.max_time includes them). Under
torchrun every rank takes rank 0's cached verdict, or stays eager (DDP's collectives would be in the
timings). The checkpoint records the decision ("auto" before it is made) and a resumed run keeps it, so a
resume stays bit-exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from tformer.accel import training as rule
from tformer.accel.machine import mode
from tformer.accel.tune import Key, Tuner
from tformer.training.autocast import scratch_steps, trial_step

# module -> its compiled call, kept while the module runs eagerly (evaluation, an "auto" trial)
_compiled_calls: weakref.WeakKeyDictionary[torch.nn.Module, Callable[..., Any]] = weakref.WeakKeyDictionary()


def compile_steps(module: torch.nn.Module) -> None:
    """Compile `module`'s calls in place (`Module.compile()`: the module, its names and state dict stay);
    once per module, the compiled call kept for `set_compiled`."""
    if module not in _compiled_calls:
        module.compile()
        call = module._compiled_call_impl
        assert call is not None  # Module.compile() just set it
        _compiled_calls[module] = call
    set_compiled(module, True)


def set_compiled(module: torch.nn.Module, on: bool) -> None:
    """Calls of `module` run its compiled call (made by `compile_steps`) or eagerly."""
    module._compiled_call_impl = _compiled_calls.get(module) if on else None


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def eager(module: torch.nn.Module) -> Iterator[None]:
    """Calls of `module` run uncompiled inside (evaluation, decoding), compiled again after if they were."""
    saved = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = saved


def _shapes(value: object) -> list[object]:
    """The shapes of the tensors in a batch (a tensor, a dataclass, a mapping or a sequence of them)."""
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_shapes(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        return [[str(k), _shapes(v)] for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    return []


def batch_shapes(batches: Sequence[object]) -> str | None:
    """The tensor shapes every batch has (the last may differ: an epoch's remainder compiles once more), as
    one string; None where they differ between batches."""
    if not batches:
        return None
    first = _shapes(batches[0])
    for batch in batches[1:-1]:
        if _shapes(batch) != first:
            return None
    return json.dumps(first, separators=(",", ":"))


def model_key(module: torch.nn.Module, precision: str, shapes: str) -> Key:
    """The tuning key of a training step: the model's class, size and configuration, precision, batch."""
    config = getattr(module, "config", None)
    to_dict = getattr(config, "to_dict", None)
    described = json.dumps(to_dict() if callable(to_dict) else repr(config), sort_keys=True, default=str)
    digest = hashlib.sha256(described.encode()).hexdigest()[:16]
    n_params = sum(p.numel() for p in module.parameters())
    return (type(module).__name__, n_params, digest, precision, shapes)


def decide(
    module: torch.nn.Module,
    loss: Callable[[], torch.Tensor],
    *,
    precision: str,
    device: torch.device,
    distributed: bool,
    batches: Sequence[object],
    step_s: float,
    remaining_s: float,
    tuner: Tuner,
) -> tuple[bool, str]:
    """Whether a run asked for `compile = "auto"` compiles its training steps from now on (see the module
    doc), with `loss()` the summed loss of one of its batches, `batches` its epoch, `step_s` the seconds its
    last eager step took and `remaining_s` what the rest of the run would take eagerly. -> (compile, why);
    the module is left uncompiled either way."""
    if mode() == "off":
        return False, "TFORMER_ACCEL=off"
    if device.type != "cpu":
        return False, f"measured on CPUs only; this run is on {device.type}"
    shapes = batch_shapes(batches)
    if shapes is None:
        return False, "batch shapes vary: a compiled model would compile again for each new shape"
    if remaining_s < rule.MIN_RUN_S:
        return False, (
            f"a short run (about {remaining_s:.0f} s more at {step_s:.2g} s a step; compiled from "
            f"{rule.MIN_RUN_S:.0f} s)"
        )
    key = model_key(module, precision, shapes)
    if distributed:
        ratio = rule.cached(key, tuner)
        if ratio is None:
            return False, "not measured on this machine (under torchrun only a cached verdict is used)"
        return ratio >= rule.MIN_SPEEDUP, f"this machine's cached verdict: compiled step {ratio:.2f}x eager"

    def step(compiled: bool) -> None:
        if compiled:
            compile_steps(module)
        else:
            set_compiled(module, False)
        trial_step(module, loss, precision)

    try:
        with scratch_steps(module):
            return rule.confirm(key, step, tuner)
    finally:
        set_compiled(module, False)
