"""Training throughput at 1 and 2 processes: the Shakespeare character LM (configs/shakespeare_char.toml)
with the same global batch per step (2 x 12 windows of 64 characters).

    .venv/bin/python benchmarks/distributed.py [--steps 40] [--repeats 2] [--json out.json]

Runs, interleaved round by round so machine drift hits all alike:
  1 process, 2 threads     `tformer train lm ... train.accumulate=2`
  1 process, 1 thread      the same with OMP_NUM_THREADS=1
  2 processes x 1 thread   `tformer train lm ... --nproc 2` (torchrun, DDP over gloo), accumulate 1
Each figure is global training tokens per second from log.jsonl (windows of 10 steps, the first dropped as
warm-up), median over windows and rounds; process start-up, data reading and evaluation are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.toml"
RUNS = {
    "1 process, 2 threads (accumulate 2)": ([], {"OMP_NUM_THREADS": "2"}, 2),
    "1 process, 1 thread (accumulate 2)": ([], {"OMP_NUM_THREADS": "1"}, 2),
    "2 processes x 1 thread, DDP (accumulate 1)": (["--nproc", "2"], {"OMP_NUM_THREADS": "1"}, 1),
}


def run_once(extra: list[str], env: dict[str, str], accumulate: int, steps: int, out: Path) -> list[float]:
    cmd = [sys.executable, "-m", "tformer", "train", "lm", "--config", str(CONFIG), "--out", str(out)]
    cmd += [*extra, "--no-progress", "--overwrite", f"train.max_steps={steps}", "train.log_every=10"]
    cmd += [f"train.accumulate={accumulate}", "train.eval_every_epochs=100", "train.schedule=constant"]
    cmd += ["data.valid_fraction=0.01"]  # the final evaluation is not timed; keep it short
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records if r["type"] == "train"][1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for i, (name, (extra, env, acc)) in enumerate(RUNS.items()):
                samples[name] += run_once(extra, env, acc, args.steps, Path(tmp) / f"{r}-{i}")
                print(f"round {r + 1}: {name}: {statistics.median(samples[name]):,.0f} tokens/s", flush=True)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    base = medians["1 process, 2 threads (accumulate 2)"]
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print("| run | tokens/s (median) | vs 1 process, 2 threads |")
    print("| --- | ---: | ---: |")
    for name, value in medians.items():
        print(f"| {name} | {value:,.0f} | {value / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"steps": args.steps, "repeats": args.repeats, "medians": medians, "samples": samples},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
