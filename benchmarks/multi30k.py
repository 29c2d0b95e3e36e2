"""Multi30k German -> English: train with configs/multi30k_de_en.toml, report test2016 sacreBLEU.

    .venv/bin/python benchmarks/multi30k.py [--config configs/multi30k_de_en.toml] [--out runs/multi30k]
        [--beam 5] [--average 5] [key=value ...]

Data comes from $TFORMER_DATA or ../shared/data (skips with a message when absent). One training run gives
up to four models, each scored on test2016 (beam and greedy BLEU, chrF): "raw", the last weights; "best",
the checkpoint train.keep_best kept; "average", the mean of the run's last --average checkpoints
(`tformer average RUN --last K`); "ema", the last checkpoint's moving average (train.ema; `tformer average
CKPT --ema`). Writes OUT/results.json (per model: BLEU with its signature, greedy BLEU, chrF, decoding
time; training time, curve) and OUT/loss_curve.png.
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
from tformer.training import run_dir
from tformer.training.average import average_checkpoints, last_checkpoints
from tformer.viz.plots import loss_curve


def models(out: Path, checkpoint: Path, k: int, ema: bool) -> dict[str, Path]:
    """The run's models to score: the last weights, the best, the last `k` averaged, the moving average."""
    found = {"raw": run_dir.resolve(checkpoint)}
    best = run_dir.best(out)
    if best is not None:
        found["best"] = best
    kept = len(run_dir.checkpoints(out))
    if k > 1 and kept > 1:
        paths = last_checkpoints(out, min(k, kept))
        found[f"average of {len(paths)}"] = average_checkpoints(paths, out / "average", overwrite=True)
    if ema:
        found["ema"] = average_checkpoints([found["raw"]], out / "ema", ema=True, overwrite=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/multi30k_de_en.toml")
    parser.add_argument("--out", default="runs/multi30k")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--length-penalty", type=float, default=0.6)
    parser.add_argument("--average", type=int, default=5, help="checkpoints in the average (1: none)")
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
    pairs, _ = read_parallel(config.data.paths("test"))
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    out = Path(args.out)
    scores: dict[str, dict[str, object]] = {}
    for name, path in models(out, result.checkpoint, args.average, config.train.ema is not None).items():
        translator = Translator.load(path)
        t0 = time.perf_counter()
        hyps = translator.translate(sources, beam_size=args.beam, length_penalty=args.length_penalty)
        decode_seconds = time.perf_counter() - t0
        score = bleu(hyps, refs)
        greedy = translator.translate(sources, beam_size=1)
        (out / f"test_hypotheses.{name.split()[0]}.txt").write_text("\n".join(hyps) + "\n")
        scores[name] = {
            "checkpoint": str(path),
            "test_bleu": score.score,
            "bleu_signature": score.signature,
            "test_bleu_greedy": bleu(greedy, refs).score,
            "test_chrf": chrf(hyps, refs),
            "decode_seconds": decode_seconds,
        }
        print(
            f"{name}: test2016 BLEU {score.score:.2f} ({score.signature}), greedy "
            f"{scores[name]['test_bleu_greedy']:.2f}, chrF {scores[name]['test_chrf']:.1f}; "
            f"{decode_seconds:.0f} s decoding ({path})"
        )
    evals = [r for r in result.history if r.get("type") == "eval"]
    record = {
        "config": config.to_dict(),
        **scores["raw"],  # the last weights, as before this file reported several models
        "models": scores,
        "best": run_dir.best_info(out),
        "beam": args.beam,
        "length_penalty": args.length_penalty,
        "train_and_build_seconds": train_seconds,
        "steps": evals[-1]["step"] if evals else None,
        "evals": evals,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    loss_curve(result.history, out / "loss_curve.png", title="Multi30k de-en")
    print(f"{train_seconds / 60:.1f} min training, {record['steps']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
