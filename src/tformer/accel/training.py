"""`train.compile = "auto"`: torch.compile a training run where this machine measured the model's own
compiled step faster, and where the run is long enough to pay for the compilation.

Why: a compiled training step fuses the elementwise work around the products (GELU, layer norm, residual
adds, dropout, the loss) and skips PyTorch's per-op dispatch. On an AVX2-only AMD EPYC (family 25 model 1)
GPT-2 small's fp32 step ran 2.86 s compiled against 3.21 s eagerly (`tformer bench train`), while nanoGPT's
"baby" shape ran no faster compiled; the first compiled step costs a compilation (40 s for GPT-2 small with
an empty inductor cache there, a few seconds with a warm one). So neither always nor never: the trainer
(training/compiling.py) asks `confirm` with the model's own forward and backward, eager and compiled,
timed by the tuner once per machine and model and batch shape, and compiles only from `MIN_SPEEDUP` on, in
runs expected to last `MIN_RUN_S` or more (a short command never pays a compilation silently).
"""

from __future__ import annotations

from collections.abc import Callable

from tformer.accel.tune import Key, Tuner

MIN_SPEEDUP = 1.05  # a compiled training step must beat the eager one by this to be taken
MIN_RUN_S = 600.0  # runs expected to train at least this long (seconds) consider compiling
WARMUP = 2  # untimed calls each: the first compiled one compiles
MIN_REPEATS = 3  # timed rounds each (a step takes up to seconds)


def cached(key: Key, tuner: Tuner) -> float | None:
    """The compiled step's speed over the eager one's for `key`, if this machine measured it, else None."""
    return tuner.cached_ratio(("step", "compiled/eager", *key))


def confirm(key: Key, step: Callable[[bool], object], tuner: Tuner) -> tuple[bool, str]:
    """True where `step(True)` (the model's forward and backward, compiled) ran at least `MIN_SPEEDUP` times
    as fast as `step(False)` (eager); timed once per machine and `key`, cached by `tuner`. -> (compile, why)."""
    ratio = tuner.ratio(
        ("step", "compiled/eager", *key),
        fast=lambda: step(True),
        base=lambda: step(False),
        past_budget=True,
        warmup=WARMUP,
        min_repeats=MIN_REPEATS,
    )
    if ratio == 0.0:
        return False, "the compiled step failed here (see the tuning cache for why)"
    chosen = ratio >= MIN_SPEEDUP
    return (
        chosen,
        f"this model's compiled training step {ratio:.2f}x the eager one's (compiled from {MIN_SPEEDUP:g}x)",
    )
