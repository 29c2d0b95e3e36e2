"""`precision = "auto"`: bfloat16 where this machine computes it at least twice as fast as float32, else
float32; decided by measurement, not by the CPU's name.

On a CPU the deciding figure is the ratio of a bfloat16 to a float32 (1024 x 1024) @ (1024 x 1024)
product, timed once per machine by the tuner (accel/tune.py, cached with its other choices, timed even when
the tuner's budget is spent): AMX cores pass (3.5-7x on Sapphire Rapids Xeons), AVX2-only cores do not
(bfloat16 there is emulated, several times slower than float32). 1024 rather than 512: at 512 an AMX
product is short enough that its fixed costs and the machine's noise put the ratio near the threshold
(1.8-2.5x on one Xeon whose 1024 ratio was 4.7x). On CUDA the rule is the
hardware's: compute capability 8.0 or more (Ampere on), where bfloat16 runs on the tensor cores. Anything
else, and `TFORMER_ACCEL=off`, is float32.

A product's ratio is not a model's: at d_model 256 most of a training step is casts, elementwise work and
the logits, which run at memory speed, and a Xeon whose 1024-cube bfloat16 product ran 3.5x float32's
trained Multi30k's model at 1.15x alone and 0.87x with another process on the cores (BENCHMARKS.md). So
where the product rule says bf16 for a CPU training run, the trainer confirms it on the model's own step
(`confirm_by_step`: forward and backward on the run's first batch, each precision, timed by the tuner and
cached per machine and model) and keeps bf16 only from `STEP_MIN_SPEEDUP` on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tformer.accel.machine import mode
from tformer.accel.tune import Key, Tuner

BF16_MIN_SPEEDUP = 2.0
STEP_MIN_SPEEDUP = 1.1  # a bfloat16 training step must beat float32's by this to be taken
RATIO_KEY = ("matmul", "bfloat16/float32", 1024)


def bf16_speedup(tuner: Tuner) -> float:
    """This CPU's bfloat16 product speed over float32's (cached per machine by `tuner`)."""
    n = RATIO_KEY[2]
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    return tuner.ratio(RATIO_KEY, fast=lambda: a16 @ b16, base=lambda: a32 @ b32, past_budget=True)


def resolve(precision: str, device: torch.device | str, tuner: Tuner | None = None) -> tuple[str, str]:
    """`precision` as it runs on `device`: "auto" becomes "bf16" or "fp32" (see the module's doc); any
    other value is itself. -> (precision, why)."""
    if precision != "auto":
        return precision, "as configured"
    device = torch.device(device)
    if mode() == "off":
        return "fp32", "TFORMER_ACCEL=off"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return "bf16", f"CUDA compute capability {major}.{minor} >= 8.0"
        return "fp32", f"CUDA compute capability {major}.{minor} < 8.0"
    if device.type != "cpu":
        return "fp32", f"no bfloat16 rule for {device.type}"
    if tuner is None:
        from tformer import accel

        tuner = accel.tuner()
    ratio = bf16_speedup(tuner)
    chosen = "bf16" if ratio >= BF16_MIN_SPEEDUP else "fp32"
    return chosen, f"bfloat16 products {ratio:.2g}x float32's on this CPU (bf16 from {BF16_MIN_SPEEDUP:g}x)"


def confirm_by_step(key: Key, step: Callable[[str], object], tuner: Tuner | None = None) -> tuple[str, str]:
    """ "bf16" where `step("bf16")` (one training step's forward and backward under bfloat16 autocast)
    ran at least `STEP_MIN_SPEEDUP` times as fast as `step("fp32")`, else "fp32"; timed once per machine
    and `key` (the model), cached by the tuner. -> (precision, why)."""
    if tuner is None:
        from tformer import accel

        tuner = accel.tuner()
    ratio = tuner.ratio(
        ("step", "bfloat16/float32", *key),
        fast=lambda: step("bf16"),
        base=lambda: step("fp32"),
        past_budget=True,
    )
    chosen = "bf16" if ratio >= STEP_MIN_SPEEDUP else "fp32"
    return (
        chosen,
        f"this model's bfloat16 training step {ratio:.2f}x float32's (bf16 from {STEP_MIN_SPEEDUP:g}x)",
    )
