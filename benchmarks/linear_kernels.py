"""PyTorch's F.linear (MKL for float32 on x86) against tformer's linear (oneDNN), at the products tformer's
models make: forward + backward of the training shapes of `tformer bench train`, and the forward
matrix-vector / small-batch products of `tformer bench generate`'s decoding steps. Both paths are timed
interleaved; medians of `--repeats`.

    .venv/bin/python benchmarks/linear_kernels.py [--repeats 7] [--threads N] [--json PATH]

Prints a markdown table and writes benchmarks/results/linear_kernels.json (or --json). Decision 48 in
docs/decisions.md rests on these figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tformer import accel
from tformer.accel.linear import AccelLinear, onednn_available

# (name, rows of x, in features, out features, with backward)
CASES = [
    ("baby attention in_proj", 12 * 64, 128, 384, True),
    ("baby ffn linear1", 12 * 64, 128, 512, True),
    ("baby ffn linear2", 12 * 64, 512, 128, True),
    ("gpt2-small in_proj", 2 * 256, 768, 2304, True),
    ("gpt2-small ffn linear1", 2 * 256, 768, 3072, True),
    ("gpt2-small ffn linear2", 2 * 256, 3072, 768, True),
    ("gpt2-small output", 2 * 256, 768, 50257, True),
    ("decode B=1 ffn linear1", 1, 768, 3072, False),
    ("decode B=1 output", 1, 768, 50257, False),
    ("decode B=8 output", 8, 768, 50257, False),
]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default="benchmarks/results/linear_kernels.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not onednn_available():
        raise SystemExit("this PyTorch build has no oneDNN: nothing to compare")
    torch.manual_seed(0)
    rows = []
    for name, m, k, n, backward in CASES:
        layer = accel.apply(nn.Sequential(nn.Linear(k, n)))[0]
        assert type(layer) is AccelLinear
        x = torch.randn(m, k, requires_grad=backward)
        grad = torch.randn(m, n)

        def step(
            layer: nn.Module = layer, x: torch.Tensor = x, grad: torch.Tensor = grad, bw: bool = backward
        ) -> None:
            if bw:
                layer(x).backward(grad)
            else:
                with torch.no_grad():
                    layer(x)

        times: dict[str, list[float]] = {"aten": [], "onednn": []}

        def path(backend: str, layer: nn.Module = layer) -> contextlib.AbstractContextManager[None]:
            return accel.reverted(layer) if backend == "aten" else contextlib.nullcontext()

        for backend in times:  # warm-up
            with path(backend):
                step()
        for _ in range(args.repeats):
            for backend in times:
                with path(backend):
                    times[backend].append(timed(step))
        aten, onednn = (statistics.median(times[b]) for b in ("aten", "onednn"))
        flops = 2 * m * k * n * (3 if backward else 1)
        rows.append(
            {
                "case": name,
                "shape": [m, k, n],
                "backward": backward,
                "aten_ms": 1e3 * aten,
                "onednn_ms": 1e3 * onednn,
                "speedup": aten / onednn,
                "aten_gflops": flops / aten / 1e9,
                "onednn_gflops": flops / onednn / 1e9,
                "weight_gbs_onednn": 4 * k * n / onednn / 1e9,
            }
        )
        r = rows[-1]
        print(
            f"{name:24s} aten {r['aten_ms']:8.3f} ms  onednn {r['onednn_ms']:8.3f} ms  {r['speedup']:.2f}x",
            flush=True,
        )
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"\nF.linear (aten) vs tformer.accel (oneDNN), torch {torch.__version__}, {report['threads']} threads"
    )
    print("\n| product | x rows, in, out | pass | aten ms | oneDNN ms | speed-up | oneDNN GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m, k, n = r["shape"]
        print(
            f"| {r['case']} | {m}, {k}, {n} | {'fwd+bwd' if r['backward'] else 'fwd'} | {r['aten_ms']:.3f} | "
            f"{r['onednn_ms']:.3f} | {r['speedup']:.2f}x | {r['onednn_gflops']:.0f} |"
        )


if __name__ == "__main__":
    main()
