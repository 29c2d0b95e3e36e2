"""`tformer bench attention`: forward + backward time and peak memory of every attention backend against
sequence length, with this machine's matrix-multiply ceiling measured in the same run.

Each (backend, length, causal) point runs in a fresh subprocess, so its peak resident memory (ru_maxrss
minus the process's baseline before the inputs exist) is its own. Times are medians of `repeats` runs
after one warm-up. A point that would exceed `max_seconds` for its backend stops that backend's sweep.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tformer.bench.common import matmul_ceiling, pyplot, write_outputs

BACKENDS = ("math", "sdpa", "chunked", "local", "performer", "linformer")
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def _point(
    backend: str, length: int, causal: bool, batch: int, heads: int, d_head: int, repeats: int
) -> dict[str, Any]:
    """One measurement, in this process (called in a fresh subprocess by `run`)."""
    import resource

    from tformer.attention.backends import get_backend

    torch.manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fn = get_backend(backend).fn
    q, k, v = (torch.randn(batch, heads, length, d_head, requires_grad=True) for _ in range(3))
    kwargs: dict[str, Any] = {}
    if backend == "linformer":
        kwargs = {
            "proj_k": torch.randn(64, length) / length**0.5,
            "proj_v": torch.randn(64, length) / length**0.5,
        }
    if backend == "local":
        kwargs = {"window": 256}
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out, _ = fn(q, k, v, None, causal=causal, **kwargs)
        out.sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = (
        4 * batch * heads * length * length * d_head * (0.5 if causal else 1.0) * 3
    )  # fwd + 2x bwd, exact attention
    return {"seconds": statistics.median(times), "peak_mib": (peak - base) / 1024, "exact_flops": flops}


def run(
    *,
    backends: tuple[str, ...] = BACKENDS,
    lengths: tuple[int, ...] = LENGTHS,
    causal_modes: tuple[bool, ...] = (False, True),
    batch: int = 1,
    heads: int = 4,
    d_head: int = 64,
    repeats: int = 3,
    max_seconds: float = 60.0,
    out_dir: str | Path = "runs/bench-attention",
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ceiling = matmul_ceiling()
    results = []
    for causal in causal_modes:
        for backend in backends:
            if causal and backend == "linformer":
                continue  # cannot be causal
            for length in lengths:
                code = (
                    "import json; from tformer.bench.attention import _point; "
                    f"print(json.dumps(_point({backend!r}, {length}, {causal}, {batch}, {heads}, {d_head}, {repeats})))"
                )
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    results.append(
                        {
                            "backend": backend,
                            "length": length,
                            "causal": causal,
                            "error": proc.stderr.strip().splitlines()[-1][:200],
                        }
                    )
                    break
                point = json.loads(proc.stdout.strip().splitlines()[-1])
                point["fraction_of_fp32_ceiling"] = (
                    point["exact_flops"] / point["seconds"] / 1e9 / ceiling["float32"]
                )
                results.append({"backend": backend, "length": length, "causal": causal, **point})
                print(
                    f"{backend:9s} T={length:6d} causal={causal!s:5s} {1000 * point['seconds']:9.1f} ms "
                    f"{point['peak_mib']:8.1f} MiB",
                    file=sys.stderr,
                )
                if wall > max_seconds:
                    break
    report = {
        "shape": {"batch": batch, "heads": heads, "d_head": d_head},
        "matmul_gflops": ceiling,
        "results": results,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_outputs(out, "attention", report, markdown, plot)
    return report


def markdown(report: dict[str, Any]) -> str:
    c = report["matmul_gflops"]
    s = report["shape"]
    lines = [
        f"Attention forward + backward, B={s['batch']}, H={s['heads']}, D={s['d_head']}; torch {report['torch']}, "
        f"{report['threads']} threads. Matmul ceiling here: {c['float32']:.0f} GFLOP/s float32, "
        f"{c['bfloat16']:.0f} GFLOP/s bfloat16.",
        "",
        "| backend | causal | length | time | peak memory | exact-attention FLOPs / fp32 ceiling |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['causal']} | {r['length']} | failed: {r['error']} | | |")
        else:
            lines.append(
                f"| {r['backend']} | {r['causal']} | {r['length']} | {1000 * r['seconds']:.1f} ms | "
                f"{r['peak_mib']:.0f} MiB | {100 * r['fraction_of_fp32_ceiling']:.0f}% |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for causal, style in ((False, "-"), (True, "--")):
        for backend in BACKENDS:
            pts = [
                r
                for r in report["results"]
                if r["backend"] == backend and r["causal"] == causal and "seconds" in r
            ]
            if not pts:
                continue
            x = [r["length"] for r in pts]
            axes[0].plot(
                x,
                [r["seconds"] for r in pts],
                style,
                marker="o",
                label=f"{backend}{' causal' if causal else ''}",
            )
            axes[1].plot(x, [max(r["peak_mib"], 1e-1) for r in pts], style, marker="o")
    for ax, label in ((axes[0], "forward + backward (s)"), (axes[1], "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
