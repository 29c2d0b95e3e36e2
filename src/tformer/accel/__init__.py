"""Machine-specific speed-ups, applied to a built model as a transform.

tformer's models, layers and attention are written with plain `nn.Linear`, `F.linear` and
`F.scaled_dot_product_attention`: what they compute is PyTorch's definition, on any device. What is fast
differs from machine to machine, so the machine-specific paths live here and are applied to a model once
it is built, in the manner of torchao's `quantize_`:

    model = build_model(config)
    tformer.accel.apply(model)      # in place; returns the model

`apply` changes each `nn.Linear` into an `AccelLinear` (accel/linear.py: float32 CPU products through
oneDNN, compiled matrix-vector kernels for decoding) by changing its class, so its parameters, and an
optimiser or a DDP wrapper already built on them, stay the same objects and the state-dict keys do not
change; and it points each attention layer whose backend is "sdpa" at "sdpa_lowp_cpu" (accel/attention.py:
a faster kernel for short bfloat16 CPU attention, "sdpa" itself otherwise). `revert` undoes both; applying
twice is applying once. Nothing else is touched: in particular not the C library's allocator, which the
command line and benchmark entry points set themselves (tformer.allocator).

The command line and `tformer bench` apply it by default; a Python user opts in with the one call above
(predictors: `load(..., accel=True)`). `TFORMER_ACCEL=off` in the environment makes `apply` a no-op (stock
PyTorch everywhere, and the command line leaves malloc alone too), `TFORMER_ACCEL=auto` (the default)
applies it.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

from tformer.accel import attention as _attention
from tformer.accel.linear import AccelLinear, compiled_decoding, onednn_available
from tformer.accel.tune import MODES, mode
from tformer.attention.backends import get_backend
from tformer.attention.multihead import MultiHeadAttention

M = TypeVar("M", bound=nn.Module)


def _retired_variables() -> None:
    if "TFORMER_LINEAR" in os.environ:
        warnings.warn(
            "TFORMER_LINEAR is no longer read: use TFORMER_ACCEL=off for PyTorch's own kernels",
            RuntimeWarning,
            stacklevel=3,
        )


def apply(model: M) -> M:
    """Give `model`'s linear layers and attention tformer's machine-specific paths, in place (see the
    module's doc); a no-op under `TFORMER_ACCEL=off`. Returns the model."""
    if mode() == "off":
        return model
    _retired_variables()
    for module in model.modules():
        if (
            type(module) is nn.Linear
        ):  # exactly nn.Linear: a subclass (peft, torchao, torch's MHA) keeps its own
            module.__class__ = AccelLinear
        elif isinstance(module, MultiHeadAttention) and module.backend.name == "sdpa":
            module.backend = get_backend(_attention.NAME)
    return model


def revert(model: M) -> M:
    """Undo `apply`: stock `nn.Linear` modules and the "sdpa" backend again. Returns the model."""
    for module in model.modules():
        if type(module) is AccelLinear:
            module.__class__ = nn.Linear  # type: ignore[assignment]
        elif isinstance(module, MultiHeadAttention) and module.backend.name == _attention.NAME:
            module.backend = get_backend("sdpa")
    return model


@contextmanager
def reverted(model: nn.Module) -> Iterator[None]:
    """Within the block, `model` computes with stock PyTorch (what `TFORMER_ACCEL=off` gives); afterwards
    exactly the modules that had tformer's paths have them again. For side-by-side measurement (`tformer
    bench`) in one thread: the model itself changes for the block."""
    linears = [m for m in model.modules() if type(m) is AccelLinear]
    attentions = [
        m for m in model.modules() if isinstance(m, MultiHeadAttention) and m.backend.name == _attention.NAME
    ]
    revert(model)
    try:
        yield
    finally:
        for m in linears:
            m.__class__ = AccelLinear
        for a in attentions:
            a.backend = get_backend(_attention.NAME)


def describe(model: nn.Module) -> dict[str, int]:
    """How many modules of `model` take each path: {"linear:accel": n, "linear:stock": m, "attention:sdpa":
    ...}, for logs and `tformer bench`."""
    seen: Counter[str] = Counter()
    for module in model.modules():
        if type(module) is AccelLinear:
            seen["linear:accel"] += 1
        elif isinstance(module, nn.Linear):
            seen["linear:stock"] += 1
        elif isinstance(module, MultiHeadAttention):
            seen[f"attention:{module.backend.name}"] += 1
    return dict(sorted(seen.items()))


__all__ = [
    "MODES",
    "AccelLinear",
    "apply",
    "compiled_decoding",
    "describe",
    "mode",
    "onednn_available",
    "revert",
    "reverted",
]
