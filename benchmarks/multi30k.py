"""Multi30k German -> English: train with configs/multi30k_de_en.toml, report test2016 sacreBLEU.

    .venv/bin/python benchmarks/multi30k.py [--config configs/multi30k_de_en.toml] [--out runs/multi30k]
        [--beam 5] [key=value ...]

Data comes from $TFORMER_DATA or ../shared/data (skips with a message when absent). Writes
OUT/results.json (BLEU with its signature, chrF, training time, curve) and OUT/loss_curve.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tformer.config import apply_overrides, load_toml
from tformer.data.readers import read_parallel
from tformer.metrics import bleu, chrf
from tformer.pipeline import train
from tformer.tasks import Translator
from tformer.viz.plots import loss_curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/multi30k_de_en.toml")
    parser.add_argument("--out", default="runs/multi30k")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--length-penalty", type=float, default=0.6)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from tformer.allocator import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: the library no longer sets it inside Trainer.fit
    config = apply_overrides(load_toml(args.config), args.overrides)
    missing = [p for p in config.data.paths("train") + config.data.paths("test") if not Path(p).exists()]
    if missing:
        print(f"skipping: Multi30k not found ({missing[0]}); set TFORMER_DATA to the shared data folder")
        return 0
    start = time.perf_counter()
    result = train(config, args.out, overwrite=True)
    train_seconds = time.perf_counter() - start
    translator = Translator.load(result.checkpoint)
    pairs, _ = read_parallel(config.data.paths("test"))
    t0 = time.perf_counter()
    hyps = translator.translate(
        [s for s, _ in pairs], beam_size=args.beam, length_penalty=args.length_penalty
    )
    decode_seconds = time.perf_counter() - t0
    refs = [t for _, t in pairs]
    score = bleu(hyps, refs)
    greedy = translator.translate([s for s, _ in pairs], beam_size=1)
    out = Path(args.out)
    (out / "test_hypotheses.txt").write_text("\n".join(hyps) + "\n")
    evals = [r for r in result.history if r.get("type") == "eval"]
    record = {
        "config": config.to_dict(),
        "test_bleu": score.score,
        "bleu_signature": score.signature,
        "test_chrf": chrf(hyps, refs),
        "test_bleu_greedy": bleu(greedy, refs).score,
        "beam": args.beam,
        "length_penalty": args.length_penalty,
        "train_and_build_seconds": train_seconds,
        "decode_seconds": decode_seconds,
        "steps": evals[-1]["step"] if evals else None,
        "evals": evals,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    loss_curve(result.history, out / "loss_curve.png", title="Multi30k de-en")
    print(
        f"test2016 BLEU {score.score:.2f} ({score.signature}), greedy {record['test_bleu_greedy']:.2f}, "
        f"chrF {record['test_chrf']:.1f}; {train_seconds / 60:.1f} min training, {decode_seconds:.0f} s decoding"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
