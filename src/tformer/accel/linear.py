"""The linear layer's machine-specific paths: float32 CPU products through oneDNN, and compiled
matrix-vector kernels for decoding (float32 and torchao int8 weights). `accel.apply` gives a model's
`nn.Linear` modules these paths by changing their class to `AccelLinear` (same parameters, state-dict keys
and initialisation); the model code itself only knows `nn.Linear`.

Why oneDNN: PyTorch's CPU build sends float32 `F.linear` to MKL. On CPUs where MKL does not take its
AVX-512 path (AMD EPYC) its products run at a fraction of the machine's speed, while oneDNN (also inside
PyTorch, the library behind its bfloat16 and inductor CPU kernels) does not: `benchmarks/linear_kernels.py`
measured 1.4-2.0x faster forward+backward at the models' shapes on an AMD EPYC (docs/decisions.md,
decision 48). Where MKL is fast (an Intel Xeon with AVX-512) MKL can win instead: which path a layer takes
is the caller's choice (`accel.apply`), by measurement where it is asked to measure.

The oneDNN path is PyTorch's own `torch.ops.mkldnn._linear_pointwise` (what inductor emits for a frozen
CPU linear), wrapped in an autograd Function whose backward is two more oneDNN products. It is taken only
where it computes exactly `F.linear`'s function in the same precision: float32 tensors on the CPU, no
autocast (which would have cast the product to bfloat16), plain tensors (a quantised or distributed weight
subclass keeps its own kernel), and not while torch.compile, TorchScript or ONNX export is tracing (they
see `F.linear`). Results differ from MKL's only in summation order (about 1e-6 relative).

Decoding one sequence multiplies every weight matrix by a single row: a matrix-vector product whose speed
is how fast the weights stream from memory. Inside `compiled_decoding()` (what `generate(...,
compile=True)` and `tformer generate --compile` turn on, context-local: one thread's block does not reach
another thread) such a product, in inference, float32 or bfloat16 (read as it is stored, 2 bytes a weight; summed in
float32) on the CPU, is one reduction kernel that inductor
(torch.compile's compiler, called directly: decision 56) generates per weight shape, `(W * x).sum(-1) + b`
fused. Each shape compiles once per process (GPT-2 small's five shapes: about 3 s with inductor's disk
cache warm, 9 s on a cold one, on 2 cores), so it is opt-in. Where compiling fails (no C++ compiler) a
warning says so once and the layer's other path serves instead.

The same context compiles one-row products with torchao's int8 weights (`--precision int8`): one kernel
reads each int8 weight once, 1 byte instead of float32's 4, where torchao 0.18's own CPU path transposes
or dequantises the whole matrix on every call. It is torchao's function: the activation row is quantised
by torchao's own `choose_qparams_affine` / `quantize_affine`, the integer dot products are exact in float32
up to K = 1024 and the rescale follows torchao's order, so the result is torchao's bit for bit
(decision 53).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.accel import bucket as _bucket

_op: Any = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)
_PLAIN = (Tensor, nn.Parameter)


def onednn_available() -> bool:
    """This PyTorch build has oneDNN's linear kernel."""
    return _op is not None


# Products smaller than this (rows x N x K) stay on F.linear: a oneDNN call costs about 12 us more than
# an MKL one, which decides below it (1 x 128 x 128: MKL 2.7 us, oneDNN 12.8; 1 x 384 x 1152: 23.6 vs
# 26.4; 1 x 384 x 1536: 32.6 vs 27.0; 768 x 128 x 65: 74.8 vs 44.3); decision 55.
ONEDNN_MIN_MNK = 1 << 19

_gemv_on: ContextVar[bool] = ContextVar("tformer_compiled_decoding", default=False)  # context-local
# Process-wide: the compiled kernels (shared by every thread), and why compiling failed, once it has.
_gemv_broken: str | None = None
_gemv_fns: dict[tuple[Any, ...], Any] = {}
_compile_lock = threading.Lock()  # make_fx and inductor are not safe to run from two threads at once
_ao: Any = None  # torchao.quantization.quant_primitives, once a torchao int8 weight has been seen


@contextmanager
def compiled_decoding(enabled: bool = True) -> Iterator[None]:
    """Within the block, and in this thread (or asyncio task) only, an `AccelLinear`'s single-row float32
    or int8 CPU products in inference use a compiled reduction kernel (`enabled=False`: they do not,
    whatever an enclosing block said)."""
    token = _gemv_on.set(enabled)
    try:
        yield
    finally:
        _gemv_on.reset(token)


def _gemv_bf16_eager(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # bfloat16 weights read once (2 bytes each), products and sums in float32 as bfloat16 matmuls do,
    # rounded to bfloat16 at the end
    y = (weight.float() * x.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16)


def _gemv_eager(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    y = (weight * x).sum(-1)  # x (K,) -> y (N,): one pass over the weights, no temporary once fused
    if bias is not None:
        y = y + bias
    return y


class _Kernel:
    """`eager(*tensors, *consts)` compiled by inductor for the tensors of its first call (shapes, strides and
    dtypes fixed) and the given trailing constants (None for a missing bias, ints); called with the tensors.

    Traced with make_fx and handed to `torch._inductor.compile` (inductor's entry point for graphs not
    captured by dynamo), not `torch.compile`: no dynamo frame and guards around every call, which cost
    about 10 us a call (49 calls per GPT-2 decoding step: about 1 ms of a 12 ms step; decision 56). A later
    call with other strides would fail inductor's own size/stride assertion, but nothing checks dtypes,
    devices or autograd at call time: the callers (`_gemv`, `_int8_gemv`) take this path only for
    contiguous CPU tensors of the dtypes and shapes in their key, with nothing requiring grad, and the
    kernels are traced without autograd."""

    def __init__(self, eager: Any, consts: tuple[Any, ...]) -> None:
        self.eager, self.consts = eager, consts
        self.fn: Any = None

    def __call__(self, *tensors: Any) -> Any:
        if self.fn is None:
            with _compile_lock:
                if self.fn is None:  # (another thread may have compiled it meanwhile)
                    import torch._inductor
                    from torch.fx.experimental.proxy_tensor import make_fx

                    with torch.no_grad():
                        graph = make_fx(lambda *ts: self.eager(*ts, *self.consts))(*tensors)
                        self.fn = torch._inductor.compile(graph, list(tensors))
        return self.fn(*tensors)


def _compiled(eager: Any, key: tuple[Any, ...], consts: tuple[Any, ...] = ()) -> Any:
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


def _row(x: Tensor) -> Tensor:
    """A one-row input as the compiled kernels take it: (K,), contiguous."""
    return x.reshape(-1).contiguous()


def _kernel_bias(bias: Tensor | None, n: int, dtype: torch.dtype = torch.float32) -> bool:
    """The bias is one the compiled kernels take: none, or a plain CPU tensor of n values of `dtype`."""
    return bias is None or (
        type(bias) in _PLAIN and bias.dtype == dtype and bias.device.type == "cpu" and bias.shape == (n,)
    )


def _grad_wanted(weight: Tensor, bias: Tensor | None) -> bool:
    """Autograd must see this product (the compiled kernels are traced without it)."""
    return torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))


def _with_bias(
    eager: Any, key: tuple[Any, ...], args: tuple[Tensor, ...], bias: Tensor | None
) -> Tensor | None:
    """eager(*args, bias) through its compiled kernel for `key` (a missing bias is fixed into the
    kernel), or None where compiling is not possible here."""
    if bias is None:
        fn = _compiled(eager, (*key, False), (None,))
        return None if fn is None else fn(*args)
    fn = _compiled(eager, (*key, True))
    return None if fn is None else fn(*args, bias.contiguous())


def _compile_failed(exc: Exception) -> None:
    """Any compiler failure: say so once, and use the eager kernels for the rest of the process."""
    import warnings

    global _gemv_broken
    with _compile_lock:
        if _gemv_broken is not None:
            return
        _gemv_broken = f"{type(exc).__name__}: {exc}".splitlines()[0]
    warnings.warn(
        f"compiled matrix-vector products are off for this process ({_gemv_broken}); using the eager "
        "kernels (oneDNN, or torchao's for int8 weights)",
        RuntimeWarning,
        stacklevel=4,
    )


def _gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x, one float32 or bfloat16 row in inference (`_one_row_inference`), times a plain weight of its
    dtype as the compiled matrix-vector kernel (bfloat16: float32 products and sums, as bfloat16 matmuls
    accumulate); None where that kernel does not apply or compiling is not possible here."""
    if weight.dim() != 2:
        return None
    n, k = weight.shape[0], x.shape[-1]
    if not (
        weight.shape[1] == k  # else F.linear's own shape error
        and weight.dtype == x.dtype
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and k * n >= ONEDNN_MIN_MNK
        and _kernel_bias(bias, n, x.dtype)
        and not _grad_wanted(weight, bias)
        and not torch.jit.is_tracing()  # (ONNX export traces too)
    ):
        return None
    try:
        eager = _gemv_eager if x.dtype == torch.float32 else _gemv_bf16_eager
        y = _with_bias(eager, (n, k), (_row(x), weight), bias)
        return None if y is None else y.reshape(*x.shape[:-1], n)
    except Exception as exc:  # noqa: BLE001 - whatever the compiler raises
        _compile_failed(exc)
        return None


def _int8_weight(weight: Tensor) -> tuple[Tensor, Tensor, tuple[int, int] | None] | None:
    """A torchao int8 weight that `_int8_gemv` computes exactly as torchao does: (int8 values (N, K), one
    float32 scale per output row (N,), the activation's (quant_min, quant_max) when activations are
    quantised per row, symmetrically, at run time, else None); None for any other weight. The verdict
    is kept on the weight, so the zero-point check reads the tensor once."""
    verdict: Any = getattr(weight, "_tformer_int8", False)
    if verdict is False:
        verdict = None
        cls = type(weight)
        if cls.__name__ == "Int8Tensor" and cls.__module__.startswith("torchao"):
            q, scale, act = weight.qdata, weight.scale, weight.act_quant_kwargs  # type: ignore[attr-defined]
            zero = weight.zero_point  # type: ignore[attr-defined]
            if (
                q.dim() == 2
                and q.device.type == "cpu"
                and q.is_contiguous()
                and scale.dtype == torch.float32
                and scale.numel() == q.shape[0]
                and (zero is None or not bool(zero.any()))
                and weight.act_pre_scale is None  # type: ignore[attr-defined]
                and weight.act_quant_scale is None  # type: ignore[attr-defined]
            ):
                if act is None:
                    verdict = (q, scale.reshape(-1), None)
                elif act.mapping_type.name == "SYMMETRIC" and type(act.granularity).__name__ == "PerRow":
                    global _ao
                    import torchao.quantization.quant_primitives as _ao  # already imported: it made q

                    bounds = (-64, 63) if act.reduce_range else (-128, 127)
                    verdict = (q, scale.reshape(-1), bounds)
        weight._tformer_int8 = verdict  # type: ignore[attr-defined]
    return cast(tuple[Tensor, Tensor, tuple[int, int] | None] | None, verdict)


def _quantize_row(x: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """One activation row quantised as torchao quantises it (its own functions): int8 values as float32
    (K,) and their scale ()."""
    x2 = x.reshape(1, -1)
    block = [1, x2.shape[1]]
    scale, zero = _ao.choose_qparams_affine(
        x2, _ao.MappingType.SYMMETRIC, block, torch.int8, qmin, qmax, eps=torch.finfo(torch.float32).eps,
        scale_dtype=torch.float32, zero_point_dtype=torch.int8, keepdim=True,
    )  # fmt: skip
    xq = _ao.quantize_affine(x2, block, scale, zero, torch.int8, qmin, qmax)
    return xq.to(torch.float32).reshape(-1), scale.reshape(())


def _int8_gemv_eager(x: Tensor, scale_x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    # the int8 x int8 (or float x int8) dot products in float32, exact for integers below 2^24, then
    # rescaled in torchao's order: (dot * activation scale) * weight scale, then the bias
    y = (q.to(torch.float32) * x).sum(-1) * scale_x * scale  # x (K,) -> y (N,)
    if bias is not None:
        y = y + bias
    return y


def _int8_gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """One row times a torchao int8 weight as one compiled kernel that reads each int8 weight once (1 byte
    instead of the 4 that float32 reads; torchao's own CPU path dequantises or transposes the matrix on
    every call). torchao's result bit for bit: the activation row is quantised by torchao's own
    functions, the integer dot products are exact in float32 for K x 127 x 128 < 2^24 (K <= 1024;
    beyond, float32 rounding of the sums, about 1e-7 relative) and the rescale is in torchao's order.
    None where this is not such a weight."""
    found = _int8_weight(weight)
    if (  # not such a weight, F.linear's error to come, or autograd wanted
        found is None
        or found[0].shape[1] != x.shape[-1]
        or not _kernel_bias(bias, found[0].shape[0])
        or _grad_wanted(weight, bias)
    ):
        return None
    q, scale, bounds = found
    try:
        if bounds is None:  # weight-only: the activation stays as it is
            xq, scale_x = _row(x), torch.ones((), dtype=torch.float32)
        else:
            quant = _compiled(_quantize_row, (q.shape[1], *bounds), bounds)
            if quant is None:
                return None
            xq, scale_x = quant(_row(x))
        y = _with_bias(_int8_gemv_eager, tuple(q.shape), (xq, scale_x, q, scale), bias)
        return None if y is None else y.reshape(*x.shape[:-1], q.shape[0])
    except Exception as exc:  # noqa: BLE001 - whatever the compiler raises
        _compile_failed(exc)
        return None


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _op(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b; dx = dy W, dW = dy^T x, db = sum of dy: all three products in oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        dx = _onednn(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        dw = _onednn(grad2.t(), x.reshape(-1, x.shape[-1]).t(), None) if ctx.needs_input_grad[1] else None
        db = grad2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _float32_cpu_eager(x: Tensor) -> bool:
    """x is a plain float32 CPU tensor, outside autocast (and, as `linear` checks first, outside
    torch.compile's tracing)."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and type(x) in _PLAIN
        and not torch.is_autocast_enabled("cpu")
    )


def _eligible(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (
        _op is not None
        and _float32_cpu_eager(x)
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and type(weight) in _PLAIN
        and (
            bias is None
            or (type(bias) in _PLAIN and bias.dtype == torch.float32 and bias.device.type == "cpu")
        )
        and x.dim() >= 2
        and x.numel() > 0
        # mismatched shapes go to F.linear, whose error names them (oneDNN's does not)
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and (bias is None or bias.shape == weight.shape[:1])
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
    )


def _one_row_inference(x: Tensor) -> bool:
    return (  # _float32_cpu_eager's conditions, inlined: this runs for every product while decoding
        x.dim() >= 2  # (B, T, C) or (B, C), as before; a 1-D row (e.g. under vmap) stays on the eager path
        and x.numel() == x.shape[-1] > 0
        and (x.dtype == torch.float32 or x.dtype == torch.bfloat16)
        and x.device.type == "cpu"
        and type(x) in _PLAIN
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.is_autocast_enabled("cpu")
    )


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) with oneDNN's kernels (forward and backward) where that is the same
    function (see the module's doc), else F.linear."""
    if not _eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    if (torch.is_grad_enabled() and x.requires_grad) or _grad_wanted(weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def accel_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, plan: Any = None) -> Tensor:
    """F.linear(x, weight, bias) by `AccelLinear`'s paths: inside `compiled_decoding()` one-row products in
    inference through the compiled kernels; bfloat16 autocast products with padded rows where `plan` chose
    "bucket"; float32 products oneDNN can compute through oneDNN (forward and backward) where `plan` (an
    accel.plan.Plan) chose it for their shape class, or without a plan from `ONEDNN_MIN_MNK` multiply-adds
    on; everything else F.linear."""
    if torch.compiler.is_compiling():  # torch.compile and torch.export see F.linear (inductor cannot lower
        return F.linear(x, weight, bias)  # the oneDNN op on plain weights; dynamo cannot read a ContextVar)
    if _gemv_on.get() and _one_row_inference(x):  # decoding: checked first, it runs 49 times per GPT-2 token
        if type(weight) in _PLAIN:
            y = _gemv(x, weight, bias)
        else:  # torchao's int8 weights take float32 activations
            y = _int8_gemv(x, weight, bias) if x.dtype == torch.float32 else None
        if y is not None:
            return y
    if plan is not None and _bucket.bucket_eligible(x, weight, bias):
        training = (torch.is_grad_enabled() and x.requires_grad) or _grad_wanted(weight, bias)
        if plan.bf16_path(x, weight, bias, training) == "bucket":
            return _bucket.bucketed_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    if not _eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    grad = (torch.is_grad_enabled() and x.requires_grad) or _grad_wanted(weight, bias)
    if plan is None:
        if x.numel() * weight.shape[0] < ONEDNN_MIN_MNK:
            return F.linear(x, weight, bias)
    elif plan.path(x, weight, bias, grad) == "stock":
        return F.linear(x, weight, bias)
    if grad:
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


class AccelLinear(nn.Linear):
    """nn.Linear (same parameters, state-dict keys and initialisation) computed by `accel_linear`, with
    the plan `accel.apply` gave it (`_accel_plan`, shared by the model's layers; none: the fixed rule).

    `accel.apply` turns an `nn.Linear` into one by changing its class (the parameters, and so an optimiser
    built on them, stay the same objects) and `accel.revert` turns it back."""

    def forward(self, x: Tensor) -> Tensor:
        return accel_linear(x, self.weight, self.bias, self.__dict__.get("_accel_plan"))


__all__ = [
    "ONEDNN_MIN_MNK",
    "AccelLinear",
    "accel_linear",
    "compiled_decoding",
    "onednn_available",
    "onednn_linear",
]
