"""One-row products with torchao's int8 weights (`--precision int8`) as one compiled kernel
(accel/compiled.py) that reads each int8 weight once, 1 byte instead of float32's 4, where torchao 0.18's
own CPU path transposes or dequantises the whole matrix on every call.

It is torchao's function: the activation row is quantised by torchao's own `choose_qparams_affine` /
`quantize_affine`, the integer dot products are exact in float32 up to K = 1024 and the rescale follows
torchao's order, so the result is torchao's bit for bit (decision 53). torchao is imported only once a
weight of its own shows it is in use.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
from torch import Tensor

from tformer.accel.compiled import compile_failed, compiled, grad_wanted, kernel_bias, row, with_bias

# (int8 values (N, K), one float32 scale per output row (N,), the activation's (quant_min, quant_max)
# when activations are quantised per row at run time, else None)
Int8Weight: TypeAlias = tuple[Tensor, Tensor, tuple[int, int] | None]


def _int8_weight(weight: Tensor) -> Int8Weight | None:
    """A torchao int8 weight that `_int8_gemv` computes exactly as torchao does, as an `Int8Weight`; None
    for any other weight. The verdict is kept on the weight, so the zero-point check reads the tensor
    once."""
    seen = weight.__dict__.get("_tformer_int8", False)
    if seen is not False:
        return seen
    verdict = _int8_verdict(weight)
    weight.__dict__["_tformer_int8"] = verdict
    return verdict


def _int8_verdict(weight: Tensor) -> Int8Weight | None:
    cls = type(weight)
    if cls.__name__ != "Int8Tensor" or not cls.__module__.startswith("torchao"):
        return None  # (and torchao is not imported for a weight it did not make)
    try:
        from torchao.quantization import Int8Tensor
    except ImportError:  # another torchao's layout: its own kernels serve
        return None
    if not isinstance(weight, Int8Tensor):
        return None
    q, scale, act, zero = weight.qdata, weight.scale, weight.act_quant_kwargs, weight.zero_point
    if not (
        q.dim() == 2
        and q.device.type == "cpu"
        and q.is_contiguous()
        and scale.dtype == torch.float32
        and scale.numel() == q.shape[0]
        and (zero is None or not bool(zero.any()))
        and weight.act_pre_scale is None
        and weight.act_quant_scale is None
    ):
        return None
    if act is None:
        return (q, scale.reshape(-1), None)
    if act.mapping_type.name == "SYMMETRIC" and type(act.granularity).__name__ == "PerRow":
        bounds = (-64, 63) if act.reduce_range else (-128, 127)
        return (q, scale.reshape(-1), bounds)
    return None


def _quantize_row(x: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """One activation row quantised as torchao quantises it (its own functions): int8 values as float32
    (K,) and their scale (). Run only while a kernel is traced, with torchao loaded (an int8 weight)."""
    import torchao.quantization.quant_primitives as ao

    x2 = x.reshape(1, -1)
    block = [1, x2.shape[1]]
    scale, zero = ao.choose_qparams_affine(
        x2, ao.MappingType.SYMMETRIC, block, torch.int8, qmin, qmax, eps=torch.finfo(torch.float32).eps,
        scale_dtype=torch.float32, zero_point_dtype=torch.int8, keepdim=True,
    )  # fmt: skip
    xq = ao.quantize_affine(x2, block, scale, zero, torch.int8, qmin, qmax)
    return xq.to(torch.float32).reshape(-1), scale.reshape(())


def _int8_gemv_eager(x: Tensor, scale_x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    # the int8 x int8 (or float x int8) dot products in float32, exact for integers below 2^24, then
    # rescaled in torchao's order: (dot * activation scale) * weight scale, then the bias
    y = (q.to(torch.float32) * x).sum(-1) * scale_x * scale  # x (K,) -> y (N,)
    if bias is not None:
        y = y + bias
    return y


def int8_gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
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
        or not kernel_bias(bias, found[0].shape[0])
        or grad_wanted(weight, bias)
    ):
        return None
    q, scale, bounds = found
    try:
        if bounds is None:  # weight-only: the activation stays as it is
            xq, scale_x = row(x), torch.ones((), dtype=torch.float32)
        else:
            quant = compiled(_quantize_row, (q.shape[1], *bounds), bounds)
            if quant is None:
                return None
            xq, scale_x = quant(row(x))
        y = with_bias(_int8_gemv_eager, tuple(q.shape), (xq, scale_x, q, scale), bias)
        return None if y is None else y.reshape(*x.shape[:-1], q.shape[0])
    except Exception as exc:  # noqa: BLE001 - whatever the compiler raises
        compile_failed(exc)
        return None
