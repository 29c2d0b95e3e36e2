"""The "bucket" path of bfloat16 autocast products (plan class `linear/bfloat16/{train,infer}/rows`).

Under CPU bfloat16 autocast every product goes to oneDNN, which builds (JIT-compiles) a kernel for each
new shape it meets: about 7 ms a product on a Sapphire Rapids Xeon, against 1-3 ms to run it, and its cache
holds 1024 of them. Length-bucketed batches (translation, classification) give nearly every step a row
count of its own: Multi30k's first 40 bfloat16 steps spent 3.4 s building kernels against 5.3 s
running them (decision 76). The "bucket" path
pads the rows of such a product with zeros to a multiple of `ROW_BUCKET` (so that a few dozen shapes
recur), computes it in bfloat16 as autocast does, and drops the padding again; the plan takes it where
it measured faster on shapes the process has not seen (accel/plan.py). Real rows are autocast's products
of the same operands; only the weight gradient's summation order over rows can differ (float rounding).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PLAIN = (Tensor, nn.Parameter)

# A bfloat16 product's rows are padded to a multiple of this on the "bucket" path: a 3,000-token batch
# pads by 2% at most on average and its products fall into a few dozen shapes.
ROW_BUCKET = 64


class _RowBucketLinear(torch.autograd.Function):
    """F.linear as CPU bfloat16 autocast computes it, with `x`'s rows zero-padded to `rows_to` for the
    forward product and both backward products (dx = dy W, dW = dy^T x); outputs and dx without padding."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, rows_to: int) -> Tensor:
        dt = torch.bfloat16
        k, n = weight.shape[1], weight.shape[0]
        rows = x.numel() // k
        xp = x.new_empty((rows_to, k), dtype=dt)
        xp[:rows].copy_(x.reshape(rows, k))
        xp[rows:].zero_()
        w = weight.to(dt)
        b = None if bias is None else bias.to(dt)
        with torch.autocast("cpu", enabled=False):
            y = F.linear(xp, w, b)
        ctx.save_for_backward(xp, w)
        ctx.meta = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype, rows)
        return y[:rows].reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        xp, w = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, b_dtype, rows = ctx.meta
        n = w.shape[0]
        g = grad.reshape(rows, n).to(torch.bfloat16)
        gp = g.new_empty((xp.shape[0], n))
        gp[:rows].copy_(g)
        gp[rows:].zero_()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = (gp @ w)[:rows].reshape(x_shape).to(x_dtype) if need_x else None
        dw = (gp.t() @ xp).to(w_dtype) if need_w else None
        db = g.sum(0).to(b_dtype) if need_b and b_dtype is not None else None
        return dx, dw, db, None


def bucket_eligible(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """A product the "bucket" path can compute: CPU bfloat16 autocast, float32 weights (the module's
    own), plain tensors, at least `ROW_BUCKET` rows, outside tracing."""
    return (
        torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and x.device.type == "cpu"
        and (x.dtype == torch.float32 or x.dtype == torch.bfloat16)
        and type(x) in _PLAIN
        and x.dim() >= 2
        and weight.dtype == torch.float32
        and type(weight) in _PLAIN
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and (
            bias is None
            or (type(bias) in _PLAIN and bias.dtype == torch.float32 and bias.shape == weight.shape[:1])
        )
        and x.numel() >= ROW_BUCKET * weight.shape[1]
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
    )


def bucketed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) under CPU bfloat16 autocast, its rows padded to a multiple of
    `ROW_BUCKET` (see the module's doc); the caller checked `bucket_eligible`."""
    rows = x.numel() // weight.shape[1]
    rows_to = -(-rows // ROW_BUCKET) * ROW_BUCKET
    if rows_to == rows:
        return F.linear(x, weight, bias)
    out: Tensor = _RowBucketLinear.apply(x, weight, bias, rows_to)  # (torch's stubs leave apply untyped)
    return out


__all__ = ["ROW_BUCKET", "bucket_eligible", "bucketed_linear"]
