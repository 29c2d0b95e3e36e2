"""Compiled one-row kernels for decoding, and the switch that turns them on: `compiled_decoding()`.

Decoding one sequence multiplies every weight matrix by a single row: a matrix-vector product whose speed
is how fast the weights stream from memory. Such a product can be one reduction kernel that inductor
(torch.compile's compiler, called directly: decision 56) generates per weight shape: float32 and bfloat16
weights (accel/linear.py) and torchao's int8 weights (accel/int8.py). Each shape compiles once per process
(GPT-2 small's five shapes: about 3 s with inductor's disk cache warm, 9 s on a cold one, on 2 cores).

Three settings, context-local (one thread's block does not reach another thread):
- `compiled_decoding(True)` (`generate(..., compile=True)`, `tformer generate --compile`): every such
  product is compiled, and the first one of each weight shape also times the compiled kernel against the
  eager path (accel/plan.py) and caches the verdict for this machine; at batch 1 `generate` then times the
  model's whole decoding step as the default would take it against the eager step, and caches that too
  (`accel.confirm_decoding`).
- auto, the default (`compile=None`): a shape is compiled only where that cache says the compiled kernel
  measured faster here, and not at all in a model whose decoding step measured slower so
  (`accel.decoding_setting`; kernels that win alone can lose inside the step, decision 108); a shape
  never measured stays eager. So a short command never pays a cold compile
  nobody asked for, and once `tformer bench tune`, `bench generate` or a `--compile` run has measured, the
  default takes the faster kernel. Compiling that takes over a second is said once on stderr.
- `compiled_decoding(False)` (`compile=False`, `--no-compile`): never.
Where compiling fails (no C++ compiler) a warning says so once and the layer's other path serves instead.

This module holds what those kernels share: the setting, the compiled-kernel cache, the failure switch
and the checks on their operands.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

R = TypeVar("R")

PLAIN = (Tensor, nn.Parameter)  # tensor types the kernels take (not a quantised or distributed subclass)

# True: compile every one-row product; None (auto): where the machine's measurement says so; False: never
on: ContextVar[bool | None] = ContextVar("tformer_compiled_decoding", default=None)  # context-local
# Process-wide: the compiled kernels (shared by every thread), and why compiling failed, once it has.
_gemv_broken: str | None = None
_compile_s = 0.0  # seconds spent compiling in this process
_SAY_AFTER_S = 1.0  # compiling that takes longer is said once on stderr
_said = False
_gemv_fns: dict[tuple[object, ...], _Kernel[Any]] = {}  # kernels of several result types
_compile_lock = threading.Lock()  # make_fx and inductor are not safe to run from two threads at once


@contextmanager
def compiled_decoding(enabled: bool | None = True) -> Iterator[None]:
    """Within the block, and in this thread (or asyncio task) only, an `AccelLinear`'s single-row float32,
    bfloat16 or int8 CPU products in inference use a compiled reduction kernel (`enabled=False`: they do
    not; None: where this machine measured it faster, the default outside any block), whatever an
    enclosing block said."""
    token = on.set(enabled)
    try:
        yield
    finally:
        on.reset(token)


class _Kernel(Generic[R]):
    """`eager(*tensors, *consts)` compiled by inductor for the tensors of its first call (shapes, strides and
    dtypes fixed) and the given trailing constants (None for a missing bias, ints); called with the tensors.

    Traced with make_fx and handed to `torch._inductor.compile` (inductor's entry point for graphs not
    captured by dynamo), not `torch.compile`: no dynamo frame and guards around every call, which cost
    about 10 us a call (49 calls per GPT-2 decoding step: about 1 ms of a 12 ms step; decision 56). A later
    call with other strides would fail inductor's own size/stride assertion, but nothing checks dtypes,
    devices or autograd at call time: the callers (`_gemv`, `_int8_gemv`) take this path only for
    contiguous CPU tensors of the dtypes and shapes in their key, with nothing requiring grad, and the
    kernels are traced without autograd."""

    def __init__(self, eager: Callable[..., R], consts: tuple[int | None, ...]) -> None:
        self.eager, self.consts = eager, consts
        self.fn: Callable[..., R] | None = None

    def __call__(self, *tensors: Tensor) -> R:
        if self.fn is None:
            with _compile_lock:
                if self.fn is None:  # (another thread may have compiled it meanwhile)
                    import torch._inductor
                    from torch.fx.experimental.proxy_tensor import make_fx

                    start = time.perf_counter()
                    with torch.no_grad():
                        graph = make_fx(lambda *ts: self.eager(*ts, *self.consts))(*tensors)
                        self.fn = torch._inductor.compile(graph, list(tensors))
                    _spent(time.perf_counter() - start)
        return self.fn(*tensors)


def _spent(seconds: float) -> None:
    """Count compile time (under `_compile_lock`); past `_SAY_AFTER_S` say once why the command waits."""
    global _compile_s, _said
    _compile_s += seconds
    if _said or _compile_s <= _SAY_AFTER_S:
        return
    _said = True
    why = (
        "compile=True / --compile"
        if on.get()
        else "this machine measured them faster; compile=False / --no-compile skips them"
    )
    print(
        f"tformer accel: compiling matrix-vector kernels for decoding, once per weight shape per process "
        f"({why})",
        file=sys.stderr,
    )


def compiled(
    eager: Callable[..., R], key: tuple[int | bool, ...], consts: tuple[int | None, ...] = ()
) -> _Kernel[R] | None:
    """`eager` compiled for one static shape (`key`, which also names the constants), or None where
    compiling is not possible here.

    One compiled kernel per weight shape: the kernel specialised to a static shape is the fast one
    (dynamic shapes ran at about half the bandwidth)."""
    if _gemv_broken is not None:
        return None
    full = (eager.__name__,) + key
    fn = _gemv_fns.get(full)
    if fn is None:  # setdefault is atomic: threads racing here share one kernel (compiled once)
        fn = _gemv_fns.setdefault(full, _Kernel(eager, consts))
    return fn


def row(x: Tensor) -> Tensor:
    """A one-row input as the compiled kernels take it: (K,), contiguous."""
    return x.reshape(-1).contiguous()


def kernel_bias(bias: Tensor | None, n: int, dtype: torch.dtype = torch.float32) -> bool:
    """The bias is one the compiled kernels take: none, or a plain CPU tensor of n values of `dtype`."""
    return bias is None or (
        type(bias) in PLAIN and bias.dtype == dtype and bias.device.type == "cpu" and bias.shape == (n,)
    )


def grad_wanted(weight: Tensor, bias: Tensor | None) -> bool:
    """Autograd must see this product (the compiled kernels are traced without it)."""
    return torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))


def with_bias(
    eager: Callable[..., Tensor], key: tuple[int, ...], args: tuple[Tensor, ...], bias: Tensor | None
) -> Tensor | None:
    """eager(*args, bias) through its compiled kernel for `key` (a missing bias is fixed into the
    kernel), or None where compiling is not possible here."""
    if bias is None:
        fn = compiled(eager, (*key, False), (None,))
        return None if fn is None else fn(*args)
    fn = compiled(eager, (*key, True))
    return None if fn is None else fn(*args, bias.contiguous())


def first_line(exc: Exception) -> str:
    """What a compiler raised, for a one-line warning: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def compile_failed(exc: Exception) -> None:
    """Whatever the compiler raised: say so once, and use the eager kernels for the rest of the process."""
    import warnings

    global _gemv_broken
    with _compile_lock:
        if _gemv_broken is not None:
            return
        _gemv_broken = first_line(exc)
    warnings.warn(
        f"compiled matrix-vector products are off for this process ({_gemv_broken}); using the eager "
        "kernels (oneDNN, or torchao's for int8 weights)",
        RuntimeWarning,
        stacklevel=4,
    )
