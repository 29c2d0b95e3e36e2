"""`tformer bench tune`: measure now, once, which kernel each shape class of the benchmark models takes on
this machine (tformer.accel), instead of on first use; print the choices and where they are cached.

It runs tformer's language model at each `bench train` shape through one float32 training step (forward
and backward at the training batch) and a few greedy decoding steps at batch 1 and 8 (the inference
classes of `bench generate`; at batch 1 also whether the compiled decoding kernels beat the eager ones,
which decides what a default `generate` takes), and measures whether bfloat16 pays here (`precision = "auto"`). A later
`tformer train`, `tformer generate` or `tformer bench` on this machine reads the cache and times nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from tformer import accel
from tformer.accel.precision import resolve
from tformer.accel.tune import fingerprint
from tformer.bench.train import SHAPES
from tformer.inference.sampling import generate
from tformer.models.lm import LanguageModel


def run(shapes: tuple[str, ...] = tuple(SHAPES)) -> dict[str, Any]:
    """Tune every shape class of `shapes`; -> {"choices": {class: path}, "precision": ..., "seconds": ...}."""
    if accel.mode() == "off":
        raise ValueError("TFORMER_ACCEL=off: nothing to tune (stock PyTorch everywhere)")
    tuner = accel.tuner()
    start = time.perf_counter()
    precision, why = resolve("auto", "cpu", tuner)
    choices: dict[str, str] = {}
    for name in shapes:
        shape = SHAPES[name]
        torch.manual_seed(0)
        lm = accel.apply(LanguageModel(shape.lm_config()))
        ids = torch.randint(shape.vocab_size, (shape.batch, shape.block + 1))
        logits = lm(ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        for batch in (1, 8):  # batch 1 also times the compiled one-row kernels against the eager ones
            generate(lm, ids[:batch, :8], max_new_tokens=2, greedy=True, compile=batch == 1)
        choices.update(accel.recorded(lm) or {})
        print(f"  {name}: {len(accel.recorded(lm) or {})} shape classes", file=sys.stderr)
    return {
        "choices": dict(sorted(choices.items())),
        "precision": precision,
        "precision_why": why,
        "seconds": time.perf_counter() - start,
        "timing_seconds": tuner.spent_s,
        "cache": str(tuner.path),
        "machine": fingerprint(),
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}; ISA {' '.join(m['isa']) or 'n/a'}.",
        f'precision = "auto" -> {report["precision"]} ({report["precision_why"]}).',
        f"Measured in {report['timing_seconds']:.1f} s ({report['seconds']:.1f} s in all); cached in "
        f"{report['cache']}.",
        "",
        "| shape class (dtype / mode / rows / out x in) | path |",
        "|---|---|",
    ]
    lines += [f"| {k.removeprefix('linear/')} | {v} |" for k, v in report["choices"].items()]
    return "\n".join(lines) + "\n"


def cli(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = tuple(s for s in args.shapes.split(",") if s)
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape {unknown[0]!r}; expected one of {', '.join(SHAPES)}")
    print(markdown(run(names)))
    return 0
