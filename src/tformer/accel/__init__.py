"""Machine-specific speed-ups, applied to a built model as a transform.

tformer's models, layers and attention are written with plain `nn.Linear`, `F.linear` and
`F.scaled_dot_product_attention`: what they compute is PyTorch's definition, on any device. What is fast
differs from machine to machine, so the machine-specific paths live here and are applied to a model once
it is built, in the manner of torchao's `quantize_`:

    model = build_model(config)
    tformer.accel.apply(model)      # in place; returns the model

`apply` changes each `nn.Linear` into an `AccelLinear` (accel/linear.py: float32 CPU products through
oneDNN, compiled matrix-vector kernels for decoding) and each `nn.Dropout` into an `AccelDropout`
(accel/dropout.py: a mask from a quarter of the random draws) by changing its class, so its parameters, and an
optimiser or a DDP wrapper already built on them, stay the same objects and the state-dict keys do not
change; and it points each attention layer whose backend is "sdpa" at "sdpa_lowp_cpu" (accel/attention.py:
a faster kernel for short bfloat16 CPU attention, "sdpa" itself otherwise). `revert` undoes both; applying
twice is applying once. Nothing else is touched: in particular not the C library's allocator, which the
command line and benchmark entry points set themselves (tformer.allocator).

Which path a linear or dropout layer takes is chosen by measurement, not by what one machine once measured: the
first product of each shape class (float32, train or inference, rows 1 / 2-16 / >16, out x in) times
stock `F.linear` against oneDNN on this machine, keeps oneDNN only where it beat stock by more than the
timing's noise, and caches the choice per machine fingerprint in the user's cache directory
(accel/plan.py, accel/tune.py; `tformer bench tune` measures ahead). `recorded(model)` gives the choices a
model made, which a training run keeps in its checkpoint and takes back on resume. `precision = "auto"`
is decided the same way (accel/precision.py).

The command line and `tformer bench` apply it by default; a Python user opts in with the one call above
(predictors: `load(..., accel=True)`). `TFORMER_ACCEL=off` in the environment makes `apply` a no-op (stock
PyTorch everywhere, and the command line leaves malloc alone too), `TFORMER_ACCEL=auto` (the default)
applies it.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

from tformer import __version__
from tformer.accel import attention as _attention
from tformer.accel import decode_graph as _decode_graph
from tformer.accel.compiled import PLAIN, compiled_decoding
from tformer.accel.decode_graph import DecodeGraph
from tformer.accel.dropout import AccelDropout
from tformer.accel.linear import AccelLinear, onednn_available
from tformer.accel.machine import MODES, mode
from tformer.accel.plan import STREAMED, Plan
from tformer.accel.tune import Tuner
from tformer.attention.backends import get_backend
from tformer.attention.kv_cache import DecodingCache
from tformer.attention.multihead import MultiHeadAttention

M = TypeVar("M", bound=nn.Module)


class _Modules(Protocol):
    """A model as `decoding_setting` and `confirm_decoding` read it (an nn.Module, or a protocol of one)."""

    def modules(self) -> Iterator[nn.Module]: ...


def _retired_variables() -> None:
    if "TFORMER_LINEAR" in os.environ:
        warnings.warn(
            "TFORMER_LINEAR is no longer read: use TFORMER_ACCEL=off for PyTorch's own kernels",
            RuntimeWarning,
            stacklevel=3,
        )


_tuner: Tuner | None = None
_tuner_lock = threading.Lock()


def tuner() -> Tuner:
    """This process's tuner (accel/tune.py), on the machine's cache file; it says on stderr, once, when
    measuring takes more than a second."""
    global _tuner
    with _tuner_lock:
        if _tuner is None:
            _tuner = Tuner(report=lambda line: print(line, file=sys.stderr))
        return _tuner


# accel's module classes -> the stock class each replaces (exactly that class: a subclass keeps its forward)
_SWAPPED: dict[type[nn.Module], type[nn.Module]] = {AccelLinear: nn.Linear, AccelDropout: nn.Dropout}


def _plan_of(model: _Modules) -> Plan | None:
    return next((m.__dict__["_accel_plan"] for m in model.modules() if "_accel_plan" in m.__dict__), None)


def apply(model: M, *, choices: dict[str, str] | None = None, measure: bool = True) -> M:
    """Give `model`'s linear layers and attention tformer's machine-specific paths, in place (see the
    module's doc); a no-op under `TFORMER_ACCEL=off`. Returns the model.

    Each linear layer's path is chosen per shape class by timing on first use (`measure`; False: the fixed
    rule, no timing); `choices` (what `recorded` returned for a run) fix the classes they name. Applying
    again keeps the model's plan, and takes `choices` into it."""
    if mode() == "off":
        return model
    _retired_variables()
    plan = _plan_of(model)
    if plan is None:
        plan = Plan(tuner() if measure else None)
    if choices:
        plan.update(choices)
    for module in model.modules():
        # exactly nn.Linear: a subclass (peft, torchao, torch's MultiheadAttention) keeps its own forward
        if type(module) is nn.Linear:
            module.__class__ = AccelLinear
        elif type(module) is nn.Dropout:
            module.__class__ = AccelDropout
        if type(module) in _SWAPPED:
            module.__dict__["_accel_plan"] = plan
        elif isinstance(module, MultiHeadAttention) and module.backend.name in ("sdpa", _attention.NAME):
            module.backend = _attention.backend(plan)  # float32 classes chosen by the model's plan
    return model


def recorded(model: nn.Module) -> dict[str, str] | None:
    """The paths `model`'s accelerated layers chose so far, by shape class (for a checkpoint), or None
    where accel was not applied."""
    plan = _plan_of(model)
    return None if plan is None else dict(sorted(plan.choices.items()))


def agree(model: nn.Module, decide: Callable[[str, str], str]) -> None:
    """Training choices of `model` go through `decide(class, local winner)` (torchrun: rank 0's winner)."""
    plan = _plan_of(model)
    if plan is not None:
        plan.agree = decide


def _decoding_key(model: _Modules) -> tuple[str, str, str]:
    """The tuner's class of `model`'s batch-1 decoding step: its accelerated layers' weight kinds and
    shapes, e.g. ("decode-step", "float32:2304x768,float32:3072x768,...", "streamed")."""
    shapes = {
        f"{'int8' if type(m.weight) not in PLAIN else str(m.weight.dtype).removeprefix('torch.')}:"
        f"{m.weight.shape[0]}x{m.weight.shape[-1]}"
        for m in model.modules()
        if type(m) is AccelLinear
    }
    return ("decode-step", ",".join(sorted(shapes)), STREAMED)  # its shapes' verdicts timed from memory


def decoding_setting(model: _Modules, compile: bool | None) -> bool | None:
    """The `compiled_decoding` setting to decode `model` with: `compile` itself, except that the default
    (None: each one-row product compiled where its kernel alone measured faster) becomes False where this
    machine measured that default slower than the eager kernels in this model's own decoding step
    (`confirm_decoding`; decision 108)."""
    if compile is not None:
        return compile
    plan = _plan_of(model)
    if plan is None or plan.tuner is None:
        return None
    return False if plan.tuner.lookup(_decoding_key(model), stock="eager") == "eager" else None


def confirm_decoding(model: _Modules, step: Callable[[bool | None], object]) -> None:
    """Once per machine and decoding class (`_decoding_key`), after compile=True measured each one-row
    product's compiled kernel alone: time `model`'s whole batch-1 decoding step as the default would
    take it (`step(None)`) against the eager kernels (`step(False)`), and cache which was faster for
    `decoding_setting`. Kernels that win alone can lose inside the step: on an AVX2-only AMD EPYC the
    compiled int8 kernels and torchao's hand the two cores over at every call (decision 108). Nothing is
    timed where no product has a compiled verdict (the default is then eager already). `step` runs one
    decoding step on a scratch copy of the caller's cache, under `compiled_decoding(setting)`."""
    plan = _plan_of(model)
    if plan is None or plan.tuner is None or not plan.auto_compiles():
        return
    key = _decoding_key(model)
    if plan.tuner.lookup(key, stock="eager") is not None:
        return
    plan.tuner.choose(
        key,
        {"eager": lambda: step(False), "compiled": lambda: step(None)},
        stock="eager",
    )


def _graph_key(model: _Modules) -> tuple[str, str, str]:
    """The tuner's class of `model`'s whole-step decoding graph (decision 111): as `_decoding_key`."""
    return ("decode-graph",) + _decoding_key(model)[1:]


def decoding_graph(model: nn.Module, compile: bool | None, batch: int, steps: int) -> DecodeGraph | None:
    """The compiled whole decoding step (accel/decode_graph.py) that `generate` should decode `model` with
    for `steps` tokens of `batch` rows, or None (its per-product kernels): at batch 1, with compile=True
    wherever it compiles; by default where this machine measured it at least MIN_SPEEDUP faster than the
    default's kernels and it is compiled in this process already or these steps pay for compiling it."""
    if compile is False or batch != 1 or not _decode_graph.eligible(model):
        return None
    if compile is True:
        return _decode_graph.graph_for(model)
    plan = _plan_of(model)
    if plan is None or plan.tuner is None:
        return None
    record = plan.tuner.record(_graph_key(model))
    ratio = None if record is None or record.get("tformer") != __version__ else record.get("ratio")
    if not isinstance(ratio, (int, float)) or ratio < _decode_graph.MIN_SPEEDUP:
        return None
    graph = _decode_graph.compiled_graph(model)
    if graph is None and record is not None and _decode_graph.worth_compiling(record, steps):
        graph = _decode_graph.graph_for(model)
    return graph


def confirm_graph(model: nn.Module, graph: DecodeGraph, token: Tensor, cache: DecodingCache) -> None:
    """Once per machine and model class (`_graph_key`), with compile=True after the first decoding step:
    time `graph`'s step against the default's kernels (`decoding_setting(model, None)`), each on a
    scratch copy of `cache`, and cache the ratio with the seconds the compile took (for
    `decoding_graph`'s default)."""
    plan = _plan_of(model)
    if plan is None or plan.tuner is None or plan.tuner.cached_ratio(_graph_key(model)) is not None:
        return
    setting = decoding_setting(model, None)

    def kernels() -> object:
        with compiled_decoding(setting), torch.no_grad():
            return model(token, cache=cache.clone(), last_only=True, checked=True)

    def whole() -> object:
        with torch.no_grad():
            return graph(model, token, cache.clone())

    plan.tuner.ratio(
        _graph_key(model), whole, kernels, warmup=2, min_repeats=5, extra={"compile_s": graph.compile_s}
    )


def revert(model: M) -> M:
    """Undo `apply`: stock `nn.Linear` modules and the "sdpa" backend again. Returns the model."""
    for module in model.modules():
        if type(module) in _SWAPPED:
            module.__class__ = _SWAPPED[type(module)]
            module.__dict__.pop("_accel_plan", None)
        elif isinstance(module, MultiHeadAttention) and module.backend.name == _attention.NAME:
            module.backend = get_backend("sdpa")
    return model


@contextmanager
def reverted(model: nn.Module) -> Iterator[None]:
    """Within the block, `model` computes with stock PyTorch (what `TFORMER_ACCEL=off` gives); afterwards
    exactly the modules that had tformer's paths have them again. For side-by-side measurement (`tformer
    bench`) in one thread: the model itself changes for the block."""
    swapped = [(m, type(m)) for m in model.modules() if type(m) in _SWAPPED]
    attentions = [
        (m, m.backend)
        for m in model.modules()
        if isinstance(m, MultiHeadAttention) and m.backend.name == _attention.NAME
    ]
    plan = _plan_of(model)
    revert(model)
    try:
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            if plan is not None:
                m.__dict__["_accel_plan"] = plan
        for a, backend in attentions:
            a.backend = backend


def describe(model: nn.Module) -> dict[str, int]:
    """How many modules of `model` take each path: {"linear:accel": n, "linear:stock": m, "dropout:accel":
    ..., "attention:sdpa": ...}, for logs and `tformer bench`."""
    seen: Counter[str] = Counter()
    for module in model.modules():
        if type(module) is AccelLinear:
            seen["linear:accel"] += 1
        elif isinstance(module, nn.Linear):
            seen["linear:stock"] += 1
        elif type(module) is AccelDropout:
            seen["dropout:accel"] += 1
        elif isinstance(module, nn.Dropout):
            seen["dropout:stock"] += 1
        elif isinstance(module, MultiHeadAttention):
            seen[f"attention:{module.backend.name}"] += 1
    return dict(sorted(seen.items()))


__all__ = [
    "MODES",
    "AccelDropout",
    "AccelLinear",
    "apply",
    "compiled_decoding",
    "confirm_decoding",
    "confirm_graph",
    "decoding_graph",
    "decoding_setting",
    "describe",
    "mode",
    "onednn_available",
    "revert",
    "reverted",
]
