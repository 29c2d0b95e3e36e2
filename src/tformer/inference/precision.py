"""Reduced-precision inference for every model family: bfloat16 weights, or int8 linear layers.

- "fp32": the model as trained.
- "auto": "bf16" where this machine's bfloat16 products are at least twice as fast as float32's, else
  "fp32" (tformer.accel.precision).
- "bf16": every floating parameter and buffer cast to bfloat16 (`model.to(torch.bfloat16)`), so the
  activations, the KV cache and the attention kernels run in bfloat16 too. Masks stay boolean and each
  backend fills masked scores with its own dtype's most negative value (or -inf where a row is then
  zeroed), so nothing overflows; decoding and sampling read the final logits in float32/float64.
- "int8": every `nn.Linear` (attention projections, feed-forward, output heads) quantised by torchao
  (`Int8DynamicActivationInt8WeightConfig`): int8 weights with one scale per output channel, and the
  activations quantised per token at run time (one scale per row), so the matrix products are int8 x
  int8 -> int32. Embeddings, LayerNorms and the attention kernels stay float32. A tied output projection
  gets its own int8 copy; the embedding lookup keeps the float table. Decoding one sequence with
  `compile=True` (`tformer generate --compile`) computes the same function with compiled kernels that
  read each int8 weight once (tformer.accel.linear). torchao is an optional dependency
  (`pip install 'tformer[quant]'`), imported only when "int8" is asked for (docs/decisions.md).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "int8", "auto")
M = TypeVar("M", bound=nn.Module)
TORCHAO_VERSION = "0.18.0"  # the version tested; pyproject's `quant` extra pins it


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def _torchao_quantize() -> tuple[Any, Any]:
    """torchao's `quantize_` and the int8 config, imported lazily with a clear error when missing."""
    # torchao logs a warning for each CUDA-only kernel library it cannot load on a CPU build, and torch
    # one for an Enum it registers; neither concerns the CPU int8 path, so keep them off the user's screen.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as exc:
        raise RuntimeError(
            "precision 'int8' needs the optional dependency torchao: "
            f"pip install 'tformer[quant]' (or torchao=={TORCHAO_VERSION} --no-deps)"
        ) from exc
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return quantize_, Int8DynamicActivationInt8WeightConfig


def apply_precision(model: M, precision: str) -> M:
    """Convert a trained model, in place, for inference in `precision`; returns it in eval mode.

    Quantised and bfloat16 models are for inference only (int8 weights take no gradient)."""
    check_precision(precision)
    model.eval()
    if precision == "auto":  # bf16 where this machine runs it >= 2x faster than fp32 (accel/precision.py)
        from tformer.accel.precision import resolve

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        precision = resolve("auto", device)[0]
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision == "int8":
        quantize_, config = _torchao_quantize()
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise ValueError("precision 'int8' quantises a float32 model; this one has other dtypes")
        quantize_(model, config())
    return model
