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

Decoding (accel/compiled.py: inside `compiled_decoding()`, or by default where this machine measured it
faster): a one-row product in inference, float32 or bfloat16 (read as it is stored, 2 bytes a weight;
summed in float32) on the CPU, is one reduction kernel that inductor generates per weight shape,
`(W * x).sum(-1) + b` fused; torchao's int8 weights take accel/int8.py's kernel. Products of torchao's
int8 weights with several rows take accel/int8.py's dequantised product where this machine measured
it faster than torchao's own (`Plan.int8_path`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.accel import bucket as _bucket
from tformer.accel import compiled as _compiled
from tformer.accel.compiled import PLAIN as _PLAIN
from tformer.accel.compiled import compile_failed, compiled_decoding, grad_wanted, kernel_bias, row, with_bias
from tformer.accel.int8 import dequant_eligible, int8_dequant_linear, int8_gemv

if TYPE_CHECKING:
    from tformer.accel.plan import Plan

_op: Callable[..., Tensor] | None = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)


def onednn_available() -> bool:
    """This PyTorch build has oneDNN's linear kernel."""
    return _op is not None


# Products smaller than this (rows x N x K) stay on F.linear: a oneDNN call costs about 12 us more than
# an MKL one, which decides below it (1 x 128 x 128: MKL 2.7 us, oneDNN 12.8; 1 x 384 x 1152: 23.6 vs
# 26.4; 1 x 384 x 1536: 32.6 vs 27.0; 768 x 128 x 65: 74.8 vs 44.3); decision 55.
ONEDNN_MIN_MNK = 1 << 19


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
        and kernel_bias(bias, n, x.dtype)
        and not grad_wanted(weight, bias)
        and not torch.jit.is_tracing()  # (ONNX export traces too)
    ):
        return None
    try:
        eager = _gemv_eager if x.dtype == torch.float32 else _gemv_bf16_eager
        y = with_bias(eager, (n, k), (row(x), weight), bias)
        return None if y is None else y.reshape(*x.shape[:-1], n)
    except Exception as exc:  # noqa: BLE001 - whatever the compiler raises
        compile_failed(exc)
        return None


def compiled_row(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """A one-row inference product (`_one_row_inference`) by its compiled kernel: plain float32 or
    bfloat16 weights by `_gemv`, torchao's int8 weights (float32 activations) by `int8_gemv`; None where
    neither applies."""
    if type(weight) in _PLAIN:
        return _gemv(x, weight, bias)
    return int8_gemv(x, weight, bias) if x.dtype == torch.float32 else None


def addmv_eligible(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """`addmv_row` may compute this one-row inference product (the caller checked `_one_row_inference`):
    bfloat16 (decision 90: float32's `F.linear` is already MKL's matrix-vector kernel), a plain 2-D CPU
    weight of x's dtype and width, a bias the kernels take, no autograd, no tracing."""
    return (
        x.dtype == torch.bfloat16
        and type(weight) in _PLAIN
        and weight.dim() == 2
        and weight.dtype == x.dtype
        and weight.device.type == "cpu"
        and weight.shape[1] == x.shape[-1]
        and kernel_bias(bias, weight.shape[0], x.dtype)
        and not grad_wanted(weight, bias)
        and not torch.jit.is_tracing()
    )


def addmv_row(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A one-row product as a matrix-vector product, `torch.addmv(bias, W, x)` (`torch.mv` without a
    bias): the same function as F.linear in the same dtype (only the summation order differs), through
    ATen's matrix-vector kernel instead of the matrix-matrix one, which for one bfloat16 row on an Intel
    Xeon with AMX took 1.3-2x as long (decision 90). Chosen per shape class by measurement
    (`Plan.row_path`), for bfloat16 (`addmv_eligible`)."""
    v = row(x)
    y = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    assert _op is not None  # the callers checked onednn_available()
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


def onednn_eligible(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """oneDNN's kernel computes exactly this F.linear (see the module's doc)."""
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
    if not onednn_eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    if (torch.is_grad_enabled() and x.requires_grad) or grad_wanted(weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def accel_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, plan: Plan | None = None) -> Tensor:
    """F.linear(x, weight, bias) by `AccelLinear`'s paths: a one-row product in inference through the
    compiled kernels inside `compiled_decoding()` or by default where `plan` found them faster here, else
    as a matrix-vector product where `plan` found that faster (`Plan.row_path`); everything else by
    `eager_linear`."""
    if torch.compiler.is_compiling():  # torch.compile and torch.export see F.linear (inductor cannot lower
        return F.linear(x, weight, bias)  # the oneDNN op on plain weights; dynamo cannot read a ContextVar)
    setting = _compiled.on.get()  # decoding: checked first, it runs 49 times per GPT-2 token
    if (setting or plan is not None) and _one_row_inference(x):
        if setting:  # compile=True: compiled, and measured against eager once per weight shape
            y = compiled_row(x, weight, bias)
            if y is not None:
                if plan is not None:
                    plan.decode_path(x, weight, bias, measure=True)
                return y
        if plan is not None and not torch.jit.is_tracing():  # (ONNX export traces: it sees F.linear)
            kernel = plan.one_row(x, weight, bias, compiled=setting is None)
            if kernel == "stock":  # decided once per class: none of eager_linear's checks per call
                return F.linear(x, weight, bias)
            if kernel == "addmv":
                return addmv_row(x, weight, bias)
            if kernel == "compiled" and (y := compiled_row(x, weight, bias)) is not None:
                return y
    return eager_linear(x, weight, bias, plan)


def eager_linear(x: Tensor, weight: Tensor, bias: Tensor | None, plan: Plan | None) -> Tensor:
    """`accel_linear` without the one-row paths: bfloat16 autocast products with padded rows where `plan`
    chose "bucket"; float32 products oneDNN can compute through oneDNN (forward and backward) where `plan`
    (an accel.plan.Plan) chose it for their shape class, or without a plan from `ONEDNN_MIN_MNK`
    multiply-adds on; products of several rows with torchao int8 weights through `int8_dequant_linear`
    where `plan` chose "dequant"; everything else F.linear."""
    if (
        plan is not None
        and type(weight) not in _PLAIN
        and x.numel() != x.shape[-1]  # several rows (one row: `accel_linear`'s decoding paths)
        and dequant_eligible(x, weight, bias)
    ):
        if plan.int8_path(x, weight, bias) == "dequant":
            return int8_dequant_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    if plan is not None and _bucket.bucket_eligible(x, weight, bias):
        training = (torch.is_grad_enabled() and x.requires_grad) or grad_wanted(weight, bias)
        if plan.bf16_path(x, weight, bias, training) == "bucket":
            return _bucket.bucketed_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    if not onednn_eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    grad = (torch.is_grad_enabled() and x.requires_grad) or grad_wanted(weight, bias)
    if plan is None:
        if x.numel() * weight.shape[0] < ONEDNN_MIN_MNK:
            return F.linear(x, weight, bias)
    elif plan.path(x, weight, bias, grad) == "stock":
        return F.linear(x, weight, bias)
    if grad:
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


# Set on a model's AccelLinear layers when it compiles a decoding graph (accel/decode_graph.py): whether
# the graph computes the layer's one-row product as the reduction (True) or F.linear (False).
GRAPH_ATTR = "_accel_graph"


class AccelLinear(nn.Linear):
    """nn.Linear (same parameters, state-dict keys and initialisation) computed by `accel_linear`, with
    the plan `accel.apply` gave it (`_accel_plan`, shared by the model's layers; none: the fixed rule).

    `accel.apply` turns an `nn.Linear` into one by changing its class (the parameters, and so an optimiser
    built on them, stay the same objects) and `accel.revert` turns it back."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # traced: a whole decoding step (accel/decode_graph.py) or a user's
            return traced_linear(x, self.weight, self.bias, rows=self.__dict__.get(GRAPH_ATTR, False))
        return accel_linear(x, self.weight, self.bias, self.__dict__.get("_accel_plan"))


def traced_linear(x: Tensor, weight: Tensor, bias: Tensor | None, *, rows: bool) -> Tensor:
    """What torch.compile sees of an AccelLinear: F.linear, except that in a model with a decoding graph
    (`rows`) a one-row float32 or bfloat16 inference product is the compiled kernels' reduction, which
    inductor fuses with the work around it (decision 111)."""
    if (
        rows
        and x.numel() == x.shape[-1]
        and not torch.is_grad_enabled()
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
    ):
        eager = _gemv_eager if x.dtype == torch.float32 else _gemv_bf16_eager
        return eager(x.reshape(-1), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


__all__ = [
    "ONEDNN_MIN_MNK",
    "AccelLinear",
    "accel_linear",
    "addmv_row",
    "compiled_decoding",
    "onednn_available",
    "onednn_linear",
]
