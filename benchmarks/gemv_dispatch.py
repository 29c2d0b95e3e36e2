"""How the compiled matrix-vector kernels of `compile=True` decoding are called: through `torch.compile`
(a dynamo frame with guards around every call, what tformer did before decision 56) against tformer's way
(the kernel traced once with make_fx and compiled by `torch._inductor.compile`, no dynamo at call time).
Both run the same inductor kernel; only the call differs.

    .venv/bin/python benchmarks/gemv_dispatch.py [--repeats 5] [--json PATH]

1. Time per call of a one-row product at a tiny shape (64 x 64: the kernel itself is negligible, so this
   is the cost of the call) and at GPT-2-small's output projection.
2. A GPT-2-small greedy decoding step (random weights, 32-token prompt), the two ways alternating in one
   process, with the copy bandwidth measured after each pair (it moves on this machine: BENCHMARKS.md).
   A step is timed as (generate 33 tokens - generate 1) / 32.

Prints a markdown table and writes benchmarks/results/gemv_dispatch.json (or --json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import types
from pathlib import Path
from typing import Any

import torch

import tformer.accel.compiled as tc
import tformer.accel.linear as tl
from tformer.allocator import reuse_freed_memory
from tformer.bench.common import CopyProbe
from tformer.bench.generate import weight_bytes
from tformer.bench.train import SHAPES
from tformer.inference.sampling import generate
from tformer.models.lm import LanguageModel


class _ThroughDynamo:
    """The same eager function, compiled per shape by torch.compile (static shapes, one graph)."""

    def __init__(self, eager: Any, consts: tuple[Any, ...]) -> None:
        code = eager.__code__.replace(co_name=f"{eager.__name__}_{id(self)}")  # one code object per shape
        fn = types.FunctionType(code, vars(tl))
        self.consts = consts
        self.fn = torch.compile(fn, dynamic=False, fullgraph=True)

    def __call__(self, *tensors: Any) -> Any:
        return self.fn(*tensors, *self.consts)


KINDS = {"torch.compile (dynamo)": _ThroughDynamo, "torch._inductor.compile (tformer)": tc._Kernel}


def use(kind: str, kernels: dict[str, dict[Any, Any]]) -> None:
    """Make tformer.accel.compiled build and keep its kernels the `kind` way."""
    tc._Kernel = KINDS[kind]
    tc._gemv_fns = kernels[kind]


def per_call_us(n: int, k: int, calls: int) -> float:
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(1, k)
    with torch.no_grad(), tl.compiled_decoding():
        for _ in range(20):
            tl.accel_linear(x, w, b)
        start = time.perf_counter()
        for _ in range(calls):
            tl.accel_linear(x, w, b)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/gemv_dispatch.json")
    args = parser.parse_args()
    reuse_freed_memory()
    original = tc._Kernel
    kernels: dict[str, dict[Any, Any]] = {kind: {} for kind in KINDS}
    saved = tl.ONEDNN_MIN_MNK
    tl.ONEDNN_MIN_MNK = 0  # the tiny shape too goes to the compiled kernel
    calls: dict[str, dict[str, float]] = {}
    try:
        for kind in KINDS:
            use(kind, kernels)
            calls[kind] = {
                "1 x 64 x 64": statistics.median(per_call_us(64, 64, 5000) for _ in range(args.repeats)),
                "1 x 768 x 50257": statistics.median(
                    per_call_us(50257, 768, 20) for _ in range(args.repeats)
                ),
            }
        tl.ONEDNN_MIN_MNK = saved
        torch.manual_seed(0)
        cfg = dataclasses.replace(SHAPES["gpt2-small"].lm_config(), max_seq_len=1024)
        lm = LanguageModel(cfg).eval()
        prompt = torch.randint(cfg.vocab_size, (1, 32))
        tokens = {}
        for kind in KINDS:  # compile, and the tokens must agree
            use(kind, kernels)
            tokens[kind] = generate(lm, prompt, max_new_tokens=8, greedy=True, compile=True)
        same = all(torch.equal(t, next(iter(tokens.values()))) for t in tokens.values())
        probe = CopyProbe(512)
        pairs = []
        for i in range(args.repeats):
            step = {}
            for kind in list(KINDS)[
                :: 1 if i % 2 == 0 else -1
            ]:  # alternating order, so drift favours neither
                use(kind, kernels)
                t0 = time.perf_counter()
                generate(lm, prompt, max_new_tokens=33, greedy=True, compile=True)
                t1 = time.perf_counter()
                generate(lm, prompt, max_new_tokens=1, greedy=True, compile=True)
                t2 = time.perf_counter()
                step[kind] = ((t1 - t0) - (t2 - t1)) / 32
            pairs.append({"copy_gbs": probe.gbs(), "step_ms": {k: 1e3 * step[k] for k in KINDS}})
    finally:
        tc._Kernel = original
        tc._gemv_fns = {}
        tl.ONEDNN_MIN_MNK = saved
    wbytes = weight_bytes(lm)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "per_call_us": calls}
    report |= {"same_tokens": same, "weight_bytes": wbytes, "decoding_steps": pairs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"torch {torch.__version__}, {report['threads']} threads; same tokens both ways: {same}\n")
    print("| call | " + " | ".join(calls[next(iter(KINDS))]) + " |")
    print("|---|" + "---|" * len(calls[next(iter(KINDS))]))
    for kind, row in calls.items():
        print(f"| {kind} | " + " | ".join(f"{v:.1f} us" for v in row.values()) + " |")
    print("\n| copy GB/s | " + " | ".join(f"{k}: ms per step (of the copy floor)" for k in KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for p in pairs:
        cells = [f"{ms:.2f} ({wbytes / p['copy_gbs'] / 1e6 / ms:.0%})" for ms in p["step_ms"].values()]
        print(f"| {p['copy_gbs']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
