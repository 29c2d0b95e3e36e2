"""Tiny Shakespeare character LM at nanoGPT's CPU "baby" configuration, tformer and nanoGPT side by side.

    .venv/bin/python benchmarks/shakespeare.py [--nanogpt DIR] [--nanogpt-python PY] [--out runs/shakespeare]

Runs `tformer train lm --config configs/shakespeare_char.toml` and, with --nanogpt (a checkout of
karpathy/nanoGPT with data/shakespeare_char prepared from the same input.txt), nanoGPT's documented CPU
command, one after the other on the same machine. Both are timed as whole processes (start-up, data,
evaluations included). Reports final validation loss, wall time and median time per iteration. tformer's
validation loss is over the whole validation split; nanoGPT's is its estimate from 20 random batches.
Writes OUT/results.json. Skips with a message when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

NANOGPT_ARGS = [
    "train.py",
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]


def run_tformer(out: Path, config: str, overrides: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tformer",
        "train",
        "lm",
        "--config",
        config,
        "--out",
        str(out),
        "--no-progress",
        "--overwrite",  # each benchmark run starts afresh
        *overrides,
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    # ms per iteration within each logging window (training steps only, evaluations excluded)
    windows, prev_t, prev_s = [], 0.0, 0
    for r in train:
        windows.append(1000 * (r["time"] - prev_t) / (r["step"] - prev_s))
        prev_t, prev_s = r["time"], r["step"]
    return {
        "command": " ".join(cmd),
        "wall_s": wall,
        "steps": evals[-1]["step"],
        "final_val_loss": evals[-1]["valid_nll"],
        "median_ms_per_iter": statistics.median(windows),
        "train_s": evals[-1]["time"],
        "evals": [(r["step"], r["valid_nll"]) for r in evals],
    }


def run_nanogpt(root: Path, python: str) -> dict:
    cmd = [python, *NANOGPT_ARGS]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    iters = [
        (int(m.group(1)), float(m.group(2)))
        for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", log)
    ]
    # iterations that ran an evaluation (every 250) and the first few (warm-up) are left out of the median
    steady = [t for i, t in iters if i >= 5 and i % 250 != 0]
    evals = [
        (int(m.group(1)), float(m.group(2)))
        for m in re.finditer(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", log)
    ]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    return {
        "command": " ".join(cmd),
        "commit": commit,
        "wall_s": wall,
        "final_val_loss": evals[-1][1],
        "median_ms_per_iter": statistics.median(steady),
        "evals": evals,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/shakespeare_char.toml")
    parser.add_argument("--out", default="runs/shakespeare")
    parser.add_argument("--nanogpt", help="nanoGPT checkout with data/shakespeare_char prepared")
    parser.add_argument(
        "--nanogpt-python", default=None, help="python for nanoGPT (default: DIR/.venv/bin/python)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for tformer")
    args = parser.parse_args()
    data = Path(os.environ.get("TFORMER_DATA", "../shared/data")) / "tinyshakespeare" / "input.txt"
    if not data.exists():
        print(f"skipping: {data} not found; set TFORMER_DATA to the shared data folder")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{os.cpu_count()} cores", "tformer": run_tformer(out, args.config, args.overrides)}
    if args.nanogpt:
        root = Path(args.nanogpt)
        python = args.nanogpt_python or str(root / ".venv" / "bin" / "python")
        results["nanogpt"] = run_nanogpt(root, python)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("| | final val loss | wall time | median ms / iteration |\n|---|---|---|---|")
    for name in ("tformer", "nanogpt"):
        if name in results:
            r = results[name]
            print(
                f"| {name} | {r['final_val_loss']:.4f} | {r['wall_s']:.0f} s | {r['median_ms_per_iter']:.1f} |"
            )
    if "nanogpt" in results:
        t, n = results["tformer"], results["nanogpt"]
        print(
            f"\nnanoGPT / tformer: wall time {n['wall_s'] / t['wall_s']:.2f}x, "
            f"per iteration {n['median_ms_per_iter'] / t['median_ms_per_iter']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
