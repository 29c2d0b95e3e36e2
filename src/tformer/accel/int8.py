"""Products with torchao's int8 weights (`--precision int8`) by two paths of tformer's own, each chosen
by measurement where it beats torchao's:

- `int8_gemv`: one row as one compiled kernel (accel/compiled.py) that reads each int8 weight once, 1 byte
  instead of float32's 4, where torchao 0.18's own CPU path transposes or dequantises the whole matrix on
  every call.
- `int8_dequant_linear` ("dequant"): any number of rows, the int8 weights converted to float32 a chunk of
  rows at a time into a reused buffer and multiplied by float32's matrix kernel. torchao's CPU path is
  `torch._int_mm`, whose int8 kernels are fast only with AVX512-VNNI or AMX: on an AVX2-only AMD EPYC it
  ran 64 x 768 x 3072 in 54 ms where float32 took 2.9, and the dequantised product took about 1.6x
  float32's time (decision 107).

Both are torchao's function: the activation rows are quantised by torchao's own `choose_qparams_affine` /
`quantize_affine`, the integer dot products are exact in float32 up to K = 1024 (integers below 2^24,
whatever the summation order) and the rescale follows torchao's order, so the result is torchao's bit for
bit (decision 53). torchao is imported only once a weight of its own shows it is in use.
"""

from __future__ import annotations

import threading
from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

from tformer.accel.compiled import PLAIN, compile_failed, compiled, grad_wanted, kernel_bias, row, with_bias

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


def _quantize_rows(x2: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Activation rows (M, K) quantised as torchao quantises them, one scale per row (its own functions):
    the int8 values as float32 (M, K) and their scales (M, 1). Called only with torchao loaded (an int8
    weight)."""
    import torchao.quantization.quant_primitives as ao

    block = [1, x2.shape[1]]
    scale, zero = ao.choose_qparams_affine(
        x2, ao.MappingType.SYMMETRIC, block, torch.int8, qmin, qmax, eps=torch.finfo(torch.float32).eps,
        scale_dtype=torch.float32, zero_point_dtype=torch.int8, keepdim=True,
    )  # fmt: skip
    xq = ao.quantize_affine(x2, block, scale, zero, torch.int8, qmin, qmax)
    return xq.to(torch.float32), scale.reshape(-1, 1)


def quantize_rows_eager(x2: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """`_quantize_rows` in six tensor operations: torchao's symmetric per-row `choose_qparams_affine` and
    `quantize_affine`, step for step in the same operations (so the same values, bit for bit:
    tests/test_accel_int8.py), without the Python of their general block shapes, which took about 330 us
    a call on an AMD EPYC, four times a 768 x 768 product. The zero point of a symmetric int8 mapping is
    0 and adds nothing."""
    low = x2.amin(-1, keepdim=True).clamp(max=0.0)
    high = x2.amax(-1, keepdim=True).clamp(min=0.0)
    scale = torch.maximum(-low, high) / (float(qmax - qmin) / 2)
    scale = scale.clamp(min=torch.finfo(torch.float32).eps)
    xq = torch.clamp(torch.round(x2 * (1.0 / scale)), qmin, qmax)
    return xq, scale


def _quantize_row(x: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """One activation row quantised as torchao quantises it: int8 values as float32 (K,) and their scale
    (). Run only while a kernel is traced, with torchao loaded (an int8 weight)."""
    xq, scale = _quantize_rows(x.reshape(1, -1), qmin, qmax)
    return xq.reshape(-1), scale.reshape(())


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


# int8 weights converted to float32 at a time by `int8_dequant_linear`: 2^20 (4 MiB of float32), so a
# chunk is still in cache when its product reads it, and the buffer stays small beside the weights
DEQUANT_CHUNK = 1 << 20
_buffers = threading.local()  # per thread (a chunk is written, then read, by one call): width -> buffer


def _float_rows(q: Tensor, start: int, stop: int) -> Tensor:
    """Rows start:stop of the int8 matrix `q` as float32 (exact: integers), in this thread's buffer for
    q's width, valid until this thread's next call."""
    by_width: dict[int, Tensor] = _buffers.__dict__.setdefault("by_width", {})
    k, rows = q.shape[1], stop - start
    buf = by_width.get(k)
    if buf is None or buf.shape[0] < rows:
        buf = by_width[k] = torch.empty(rows, k, dtype=torch.float32)
    out = buf[:rows]
    out.copy_(q[start:stop])
    return out


def dequant_eligible(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """`int8_dequant_linear` computes this product: a torchao int8 weight it reads as torchao does
    (`_int8_weight`), float32 CPU activations of its width outside autocast, a bias it takes, and no
    autograd (int8 weights take no gradient)."""
    if type(weight) in PLAIN:  # (the hot path's first question: plain weights are never int8 ones)
        return False
    found = _int8_weight(weight)
    return (
        found is not None
        and type(x) in PLAIN
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() >= 1
        and x.shape[-1] == found[0].shape[1]
        and x.numel() > 0
        and kernel_bias(bias, found[0].shape[0])
        and not grad_wanted(weight, bias)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
    )


def int8_dequant_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias) for a torchao int8 weight (the caller checked `dequant_eligible`), as
    torchao computes it (activation rows quantised by its functions, then (x_q . w_q) * x scale * w
    scale + bias), with the integer products in float32's matrix kernel on `DEQUANT_CHUNK`-sized chunks of
    the weight converted to float32."""
    found = _int8_weight(weight)
    assert found is not None  # dequant_eligible
    q, scale, bounds = found
    n, k = q.shape
    x2 = x.reshape(-1, k)
    if bounds is None:  # weight-only: torchao's mm(x, w_q^T as float) * w scale
        xq, scale_x = x2, None
    else:
        xq, scale_x = quantize_rows_eager(x2, *bounds)
    step = max(1, DEQUANT_CHUNK // k)
    if n <= step:
        y = F.linear(xq, _float_rows(q, 0, n))
    else:
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        for i in range(0, n, step):
            j = min(n, i + step)
            y[:, i:j] = F.linear(xq, _float_rows(q, i, j))
    if scale_x is not None:
        y = y * scale_x
    y = y * scale
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], n)
