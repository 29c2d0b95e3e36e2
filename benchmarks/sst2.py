"""SST-2 sentiment: a Transformer classifier from scratch (configs/sst2.toml), dev accuracy and macro-F1.

    .venv/bin/python benchmarks/sst2.py [--config configs/sst2.toml] [--out runs/sst2] [key=value ...]

Data from $TFORMER_DATA or ../shared/data (skips with a message when absent). Writes OUT/results.json with
the dev accuracy after every epoch and the training time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tformer.config import RunConfig, apply_overrides, load_toml
from tformer.pipeline import train


def run(config: RunConfig, out: str, *, what: str = "SST-2") -> dict[str, Any]:
    """Train `config`, print and return the dev figures (also written to OUT/results.json)."""
    missing = [p for p in config.data.paths("train") + config.data.paths("valid") if not Path(p).exists()]
    if missing:
        print(f"skipping: SST-2 not found ({missing[0]}); set TFORMER_DATA to the shared data folder")
        return {}
    log = Path(out) / "log.jsonl"
    if log.exists():
        log.unlink()
    t0 = time.perf_counter()
    result = train(config, out, overwrite=True)
    wall = time.perf_counter() - t0
    evals = [r for r in result.history if r.get("type") == "eval"]
    record = {
        "config": config.to_dict(),
        "wall_s": wall,
        "train_s": evals[-1]["time"],
        "dev_accuracy": evals[-1]["accuracy"],
        "dev_macro_f1": evals[-1]["macro_f1"],
        "best_dev_accuracy": max(r["accuracy"] for r in evals),
        "evals": evals,
    }
    (Path(out) / "results.json").write_text(json.dumps(record, indent=2))
    print(
        f"{what} dev accuracy {100 * record['dev_accuracy']:.1f}% (macro-F1 {record['dev_macro_f1']:.3f}) after "
        f"{record['train_s'] / 60:.1f} min of training, {wall / 60:.1f} min in all"
    )
    for r in evals:
        print(
            f"  epoch {r['epoch']}: step {r['step']}, accuracy {100 * r['accuracy']:.1f}%, "
            f"valid NLL {r['valid_nll']:.3f}, {r['time'] / 60:.1f} min"
        )
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sst2.toml")
    parser.add_argument("--out", default="runs/sst2")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from tformer.allocator import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: the library no longer sets it inside Trainer.fit
    run(apply_overrides(load_toml(args.config), args.overrides), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
