"""A language model's whole batch-1 decoding step as one compiled graph (decision 111).

The compiled one-row kernels (accel/compiled.py) make each product of a decoding step fast, but the step
still runs its other ~400 operations one by one (layer norms, residual adds, GELU, the attention over the
cache, the cache writes), each a dispatcher round trip: on an AVX2-only AMD EPYC (family 25 model 1)
GPT-2 small's step took about 27 ms where its products alone took about 20. `DecodeGraph` hands the
model's own forward for one token (`model(token, cache=cache, last_only=True, checked=True)`) to
`torch.compile` once per model: inductor fuses the pointwise work into the products' kernels, each
one-row product is the compiled kernels' `(W * x).sum(-1) + b` reduction or stock F.linear, as the
machine's per-shape verdicts chose for the default (`mark`; `AccelLinear` under tracing), and the keys
and values are written into the static cache in place. Shapes are dynamic (`dynamic=True`): one graph serves every prompt length, cache capacity and
position, with the products' shapes static (parameters keep static shapes), so it compiles once per
model and process (about 35 s for GPT-2 small on 2 cores with inductor's disk cache empty).

Whether it is taken:
- `compile=True` (`generate(..., compile=True)`, `--compile`): at batch 1 with the cache, always where it
  compiles; after the first decoding step it is timed against the default's kernels
  (`accel.confirm_graph`), once per machine and model class, and the ratio cached with the seconds the
  compile took.
- the default (`compile=None`): where that ratio is at least `MIN_SPEEDUP` and either the graph is
  already compiled in this process (a server, a benchmark, a second `generate` call) or the generation's
  steps save more than the compile costs (`worth_compiling`). A short command never pays a cold compile.
- `compile=False`: never.
A model whose compile fails (no C++ compiler, an operation dynamo cannot trace) says so once and decodes
with its kernels.

Only CPU models whose linear weights are plain float32 or bfloat16 tensors get a graph (torchao's int8
tensors take their own kernels), and only batch 1 (the one measured; the server's batch decoder and beam
search keep the per-product kernels).
"""

from __future__ import annotations

import sys
import threading
import time
import types
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from tformer.accel.compiled import PLAIN, first_line
from tformer.accel.linear import GRAPH_ATTR, AccelLinear
from tformer.accel.machine import mode

MIN_SPEEDUP = 1.05  # the default takes the graph only where it measured at least this much faster

_graphs: weakref.WeakKeyDictionary[nn.Module, DecodeGraph] = weakref.WeakKeyDictionary()
_broken: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose graph failed to compile
_lock = threading.Lock()  # dynamo's compile is not safe from two threads at once


def _step(model: nn.Module, token: Tensor, cache: Any) -> Tensor:
    return model(token, cache=cache, last_only=True, checked=True).logits


class DecodeGraph:
    """`model`'s decoding step for one token, compiled. `graph(model, token, cache)` -> logits (1, 1, V),
    the cache extended in place as the eager step does. Holds no reference to the model (which holds
    none to it): the model is an argument."""

    def __init__(self, model: nn.Module) -> None:
        # A code object of its own per model: dynamo keeps its compiled graphs and their recompile limit
        # per code object, so models decoded in one process (a server's, the tests') do not share them.
        fn = types.FunctionType(_step.__code__.replace(), _step.__globals__, f"decode_step_{id(model):x}")
        self._fn = torch.compile(fn, dynamic=True, fullgraph=True)
        self.compiled = False
        self.compile_s = 0.0

    def __call__(self, model: nn.Module, token: Tensor, cache: Any) -> Tensor:
        if self.compiled:
            return self._fn(model, token, cache)
        with _lock:
            start = time.perf_counter()
            mark(model)
            print(
                "tformer accel: compiling the decoding step as one graph, once per model and process "
                "(compile=False / --no-compile skips it)",
                file=sys.stderr,
            )
            out = self._fn(model, token, cache)
            self.compile_s = time.perf_counter() - start
            self.compiled = True
        return out


def mark(model: nn.Module) -> None:
    """Say on each of `model`'s AccelLinear layers how the graph computes its one-row product: the
    reduction (True) or F.linear (False), as `_reduces` decides from the layer's plan and whether the
    default compiles any kernel in this model's step (`decoding_setting`, decision 108)."""
    from tformer.accel import decoding_setting  # (the package imports this module)

    compiled = decoding_setting(model, None) is not False
    for m in model.modules():
        if type(m) is AccelLinear:
            m.__dict__[GRAPH_ATTR] = _reduces(m, m.__dict__.get("_accel_plan"), compiled)


def _reduces(layer: nn.Linear, plan: Any, compiled: bool) -> bool:
    """The graph's kernel for this layer's one-row product, from what the default decodes it with
    (`Plan.one_row`, the machine's verdicts): the reduction where that is the compiled kernel, or oneDNN
    (which a graph cannot call; the reduction is the compiled stand-in, and the whole graph is timed
    against the kernels before the default takes it); F.linear where stock PyTorch's product (or its
    matrix-vector product) measured fastest, as bfloat16's did on an AVX2-only AMD EPYC."""
    if plan is None:
        return True
    x = layer.weight.new_zeros(1, 1, layer.weight.shape[1])
    with torch.no_grad():
        return bool(plan.one_row(x, layer.weight, layer.bias, compiled=compiled) in ("compiled", "eager"))


def eligible(model: nn.Module) -> bool:
    """A CPU model with tformer.accel's linear layers, all of plain float32 or bfloat16 weights."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return (
        mode() != "off"
        and model not in _broken
        and any(type(m) is AccelLinear for m in linears)
        and all(
            type(m) is AccelLinear
            and type(m.weight) in PLAIN
            and m.weight.device.type == "cpu"
            and m.weight.dtype in (torch.float32, torch.bfloat16)
            for m in linears
        )
    )


def graph_for(model: nn.Module) -> DecodeGraph | None:
    """`model`'s graph (made, not yet compiled, on first ask), or None where it cannot have one."""
    if not eligible(model):
        return None
    graph = _graphs.get(model)
    if graph is None:
        graph = _graphs.setdefault(model, DecodeGraph(model))
    return graph


def compiled_graph(model: nn.Module) -> DecodeGraph | None:
    """`model`'s graph where it is already compiled in this process (the caller checked `eligible`)."""
    graph = _graphs.get(model)
    return graph if graph is not None and graph.compiled else None


def failed(model: nn.Module, exc: Exception) -> None:
    """The graph did not compile: say so once for this model, and decode it with its kernels (its layers
    trace as plain linear layers again)."""
    _graphs.pop(model, None)
    _broken.add(model)
    for m in model.modules():
        m.__dict__.pop(GRAPH_ATTR, None)
    warnings.warn(
        f"tformer accel: the decoding step did not compile as one graph ({first_line(exc)}); decoding "
        "with the per-product kernels",
        RuntimeWarning,
        stacklevel=3,
    )


def worth_compiling(record: dict[str, Any], steps: int) -> bool:
    """`steps` decoding steps save more than the graph's compile took, by a cached measurement
    (`Tuner.record`, whose ratio the caller checked)."""
    median_s, compile_s = record.get("median_s"), record.get("compile_s")
    if not isinstance(median_s, dict) or not isinstance(compile_s, (int, float)):
        return False
    base, fast = median_s.get("base"), median_s.get("fast")
    if not isinstance(base, float) or not isinstance(fast, float):
        return False
    return steps * (base - fast) > compile_s
