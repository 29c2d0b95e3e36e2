"""Attention's input projections packed or split: what one packed q/k/v product saves on this CPU.

    .venv/bin/python benchmarks/projection_layout.py [--repeats 7] [--out benchmarks/results/projection_layout.json]

Issue 14 asks that every projection be a module call (so that accel or a LoRA adapter can swap it), which
raises the question of the layout: one packed (3C, C) product for q, k and v (tformer and
torch.nn.MultiheadAttention today, GPT-2's c_attn), q and a packed k/v, or three separate products
(Llama's q_proj / k_proj / v_proj, what LoRA usually targets). This times the three layouts on the same
weights with plain `F.linear` (stock PyTorch): training rows (forward + backward, float32 and bfloat16
autocast) and one-row decoding (forward, no grad), at the baby shape (C = 128, 12 x 64 rows) and GPT-2
small's (C = 768, 4 x 512 rows). Layouts alternate within each repeat; medians of the repeats; the CPU
model is printed and written with the results.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"baby": (128, 12 * 64), "gpt2-small": (768, 4 * 512)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def split_weights(w: torch.Tensor, b: torch.Tensor, layout: str, c: int) -> list[tuple[torch.Tensor, ...]]:
    """The weights as the layout's modules would hold them: separate contiguous tensors, not views."""
    if layout == "packed qkv":
        return [(w, b)]
    if layout == "q + packed kv":
        return [(w[:c].contiguous(), b[:c].contiguous()), (w[c:].contiguous(), b[c:].contiguous())]
    return [(w[i * c : (i + 1) * c].contiguous(), b[i * c : (i + 1) * c].contiguous()) for i in range(3)]


def run_layout(x: torch.Tensor, parts: list[tuple[torch.Tensor, ...]], c: int, train: bool) -> None:
    """The layout's products, then q + k + v, so every output is used (as the heads would use them)."""
    pieces = [piece for wt, bt in parts for piece in F.linear(x, wt, bt).split(c, dim=-1)]
    q, k, v = pieces
    y = q + k + v
    if train:
        y.sum().backward()


def time_once(fn: Callable[[], None], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/projection_layout.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    names = ["packed qkv", "q + packed kv", "q, k, v"]
    rows = []
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape, (c, n) in SHAPES.items():
        w = torch.randn(3 * c, c) / c**0.5
        b = torch.zeros(3 * c)
        cases = [
            ("train fp32", torch.randn(n, c), True, torch.float32),
            ("train bf16 autocast", torch.randn(n, c), True, torch.bfloat16),
            ("decode 1 row", torch.randn(1, c), False, torch.float32),
        ]
        for case, x, train, dtype in cases:
            parts = {name: split_weights(w, b, name, c) for name in names}
            if train:
                for ps in parts.values():
                    for t in ps:
                        for p in t:
                            p.requires_grad_(True)
            inner = 200 if not train else (20 if c <= 128 else 3)
            times: dict[str, list[float]] = {name: [] for name in names}

            def step(name: str, x=x, train=train, dtype=dtype, parts=parts, c=c) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    if train:
                        run_layout(x, parts[name], c, True)
                    else:
                        with torch.no_grad():
                            run_layout(x, parts[name], c, False)

            for name in names:  # warm-up
                time_once(lambda name=name: step(name), 2)
            for r in range(args.repeats):
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    times[name].append(time_once(lambda name=name: step(name), inner))
            base = statistics.median(times["packed qkv"])
            for name in names:
                med = statistics.median(times[name])
                rows.append(
                    {
                        "shape": shape,
                        "case": case,
                        "layout": name,
                        "median_us": med * 1e6,
                        "vs_packed": med / base,
                        "spread": (max(times[name]) - min(times[name])) / med,
                    }
                )
                print(f"{shape:10s} {case:20s} {name:14s} {med * 1e6:10.1f} us  {med / base:5.2f}x packed")
    result = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
