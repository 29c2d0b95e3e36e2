"""Quality and speed of fp32 / bf16 / int8 inference for the three families, measured in one run.

    .venv/bin/python benchmarks/quantization.py [--translation CKPT] [--classification CKPT] [--lm CKPT]
        [--out runs/quantization] [--repeats 5] [--max-sentences N] [--train-scale 1.0]

Each family's checkpoint is given by path, or trained here quickly (and said so in the output):
translation on the demo's French -> English number words (the demo's model, 2 epochs instead of 5),
classification on SST-2 (configs/sst2.toml, 300 steps instead of 900), language modelling on Tiny
Shakespeare (configs/shakespeare_char.toml, 600 iterations instead of 2000). Quality is read on the data
the checkpoint names in its config.json (translation: the test files, or the held-out numbers; SST-2: the
dev set; Tiny Shakespeare: the validation split), with the model converted to each precision:
BLEU / exact match (beam 4), accuracy, perplexity. Speed is the median of `--repeats` timings of fixed
workloads, the precisions interleaved within each repeat so that load on the machine hits all alike:

- translation: 64 test sentences in one batch, beam 4 (sentences/s); one sentence, greedy (latency)
- classification: 512 dev sentences (sentences/s); one sentence (latency)
- lm: 32 windows scored (tokens/s); 64 tokens generated greedily from a prompt, batch 1 (tokens/s)

Writes benchmarks/results/quantization.json (or --json) and prints a markdown table. On a machine shared
with other jobs, `--threads 1` keeps the timings from waiting on descheduled OpenMP threads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tformer.config import DataConfig, RunConfig, apply_overrides, load_toml
from tformer.data.readers import read_labelled, read_parallel, read_text
from tformer.metrics import accuracy, bleu, exact_match, perplexity
from tformer.pipeline import train
from tformer.tasks import TextClassifier, TextGenerator, Translator, load_predictor
from tformer.tasks.lm import mean_nll
from tformer.training.checkpoint import read_config

PRECISIONS = ("fp32", "bf16", "int8")
ROOT = Path(__file__).resolve().parent.parent


# --- checkpoints trained here when none is given ---------------------------------------------------
def train_translation(out: Path, scale: float) -> Path:
    """The demo's task and model (demo.py), 2 epochs instead of 5, through the file pipeline."""
    from tformer.data.synthetic import number_translation
    from tformer.demo import demo_size

    size = demo_size(quick=False)
    splits = number_translation(size.n_train, size.n_valid, size.n_test, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs in splits.items():
        (out / f"numbers_{name}.tsv").write_text("".join(f"{p.src}\t{p.tgt}\n" for p in pairs))
    model = {k: v for k, v in size.model.to_dict().items() if k not in ("src_vocab_size", "tgt_vocab_size")}
    train_cfg = size.train.to_dict() | {"epochs": max(1, round(2 * scale)), "max_time": None}
    config = RunConfig.from_dict(
        {
            "task": "translation",
            "model": model,
            "train": train_cfg,
            "data": {
                "train": [str(out / "numbers_train.tsv")],
                "valid": [str(out / "numbers_valid.tsv")],
                "test": [str(out / "numbers_test.tsv")],
                "tokenizer": "word",
                "shared_vocab": False,
            },
        }
    )
    return train(config, out / "translation", overwrite=True, progress=False).checkpoint


def train_from_config(task: str, toml: str, steps: int, out: Path) -> Path:
    config = load_toml(ROOT / toml, task=task)
    config = apply_overrides(config, [f"train.max_steps={steps}", "train.max_time=1e9"])
    return train(config, out / task, overwrite=True, progress=False).checkpoint


# --- measurement helpers ---------------------------------------------------------------------------
def median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function; one warm-up call each, then the precisions interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {p: [] for p in fns}
    for _ in range(repeats):
        for p, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(ts) for p, ts in times.items()}


def weight_megabytes(model: torch.nn.Module) -> float:
    """Size of the serialised state dict (int8 weights with their scales, bf16 or fp32 tensors)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6


def data_config(path: Path) -> DataConfig:
    """The data section the checkpoint was trained with (empty for checkpoints older than it)."""
    raw = read_config(path)
    return DataConfig.from_dict(raw.get("data", {}), source=str(path))


# --- one family each -------------------------------------------------------------------------------
def bench_translation(path: Path, repeats: int, max_sentences: int, files: list[str]) -> dict[str, Any]:
    data = data_config(path)
    files = files or data.paths("test") or data.paths("valid")
    pairs, _ = read_parallel(files)
    models = {p: load_predictor(path, precision=p) for p in PRECISIONS}
    limit = models["fp32"].model.config.max_seq_len  # type: ignore[union-attr]
    pairs = [p for p in pairs if len(models["fp32"].src_tok.encode(p[0])) <= limit][:max_sentences]  # type: ignore[union-attr]
    sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
    rows: dict[str, dict[str, Any]] = {}
    hyps: dict[str, list[str]] = {}
    for p, m in models.items():
        assert isinstance(m, Translator)
        hyps[p] = m.translate(sources, beam_size=4)
        rows[p] = {"bleu": bleu(hyps[p], refs).score, "exact_match": exact_match(hyps[p], refs)}
    batch = sources[:64]
    one = sources[len(sources) // 2]
    fast = median_times(
        {p: (lambda m=m: m.translate(batch, beam_size=4)) for p, m in models.items()}, repeats
    )
    lat = median_times({p: (lambda m=m: m.translate([one], beam_size=1)) for p, m in models.items()}, repeats)
    for p, m in models.items():
        same = sum(a == b for a, b in zip(hyps[p], hyps["fp32"], strict=True))
        rows[p].update(
            same_as_fp32=same / len(sources),
            sentences_per_s=len(batch) / fast[p],
            latency_ms=1e3 * lat[p],
            weights_mb=weight_megabytes(m.model),  # type: ignore[union-attr]
        )
    return {"checkpoint": str(path), "data": files, "sentences": len(sources), "rows": rows}


def bench_classification(path: Path, repeats: int, files: list[str]) -> dict[str, Any]:
    data = data_config(path)
    (file,) = files or data.paths("valid") or data.paths("test")
    models = {p: load_predictor(path, precision=p) for p in PRECISIONS}
    labels = models["fp32"].labels  # type: ignore[union-attr]
    rows_, _ = read_labelled(
        file, text_column=data.text_column, label_column=data.label_column, labels=labels
    )
    texts = [t for t, _ in rows_]
    gold = [labels.index(y) for _, y in rows_]
    rows: dict[str, dict[str, Any]] = {}
    preds: dict[str, list[int]] = {}
    for p, m in models.items():
        assert isinstance(m, TextClassifier)
        preds[p] = m.probabilities(texts).argmax(-1).tolist()
        rows[p] = {"accuracy": accuracy(preds[p], gold)}
    batch, one = texts[:512], [texts[0]]
    fast = median_times({p: (lambda m=m: m.probabilities(batch)) for p, m in models.items()}, repeats)
    lat = median_times({p: (lambda m=m: m.probabilities(one)) for p, m in models.items()}, repeats)
    for p, m in models.items():
        rows[p].update(
            same_as_fp32=sum(a == b for a, b in zip(preds[p], preds["fp32"], strict=True)) / len(texts),
            sentences_per_s=len(batch) / fast[p],
            latency_ms=1e3 * lat[p],
            weights_mb=weight_megabytes(m.model),  # type: ignore[union-attr]
        )
    return {"checkpoint": str(path), "data": [file], "sentences": len(texts), "rows": rows}


def bench_lm(path: Path, repeats: int, files: list[str]) -> dict[str, Any]:
    data = data_config(path)
    if files:  # a validation text given on the command line
        (file,) = files
        valid = read_text(file)
    elif data.valid:
        (file,) = data.paths("valid")
        valid = read_text(file)
    else:  # the run's own split: the last valid_fraction of the training text
        (file,) = data.paths("train")
        text = read_text(file)
        valid = text[int(len(text) * (1 - data.valid_fraction)) :]
    models = {p: load_predictor(path, precision=p) for p in PRECISIONS}
    ref = models["fp32"]
    assert isinstance(ref, TextGenerator)
    ids = torch.tensor(ref.tok.encode(valid), dtype=torch.long)
    t = ref.model.config.max_seq_len
    rows: dict[str, dict[str, Any]] = {}
    for p, m in models.items():
        assert isinstance(m, TextGenerator)
        rows[p] = {"perplexity": perplexity(mean_nll(m.model, ids))}
    window = ids[: 32 * t + 1]
    prompt = valid[:40]
    fast = median_times({p: (lambda m=m: mean_nll(m.model, window)) for p, m in models.items()}, repeats)
    gen = median_times(
        {p: (lambda m=m: m.generate(prompt, greedy=True, max_new_tokens=64)) for p, m in models.items()},
        repeats,
    )
    texts = {p: m.generate(prompt, greedy=True, max_new_tokens=64) for p, m in models.items()}  # type: ignore[union-attr]
    # compile=True (`tformer generate --compile`): one-row products as compiled kernels, float32 and int8
    compiled = {p: models[p] for p in ("fp32", "int8")}
    gen_c = median_times(
        {p: (lambda m=m: m.generate(prompt, greedy=True, max_new_tokens=64, compile=True)) for p, m in compiled.items()},  # type: ignore[union-attr]
        repeats,
    )  # fmt: skip
    for p, m in models.items():
        rows[p].update(
            same_as_fp32=float(texts[p] == texts["fp32"]),
            tokens_per_s=32 * t / fast[p],
            generate_tokens_per_s=64 / gen[p],
            generate_compiled_tokens_per_s=64 / gen_c[p] if p in gen_c else None,
            weights_mb=weight_megabytes(m.model),  # type: ignore[union-attr]
        )
        if p in gen_c:  # the compiled kernels compute the same function: the same text
            rows[p]["same_text_compiled"] = (
                m.generate(prompt, greedy=True, max_new_tokens=64, compile=True) == texts[p]
            )  # type: ignore[union-attr]
    return {"checkpoint": str(path), "data": [file], "tokens": len(ids), "rows": rows}


# --- report ----------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| family | precision | quality | vs fp32 | same output as fp32 | throughput | vs fp32 | latency / generation | vs fp32 | weights MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    spec = {
        "translation": ("bleu", "BLEU", "sentences_per_s", "sent/s", "latency_ms", "ms (1 sentence, greedy)"),
        "classification": (
            "accuracy",
            "accuracy",
            "sentences_per_s",
            "sent/s",
            "latency_ms",
            "ms (1 sentence)",
        ),
        "lm": ("perplexity", "ppl", "tokens_per_s", "tok/s", "generate_tokens_per_s", "tok/s generated"),
    }
    for family, result in report["families"].items():
        q, qname, thr, thr_unit, lat, lat_unit = spec[family]
        base = result["rows"]["fp32"]
        for p, row in result["rows"].items():
            quality = f"{100 * row[q]:.1f}%" if q == "accuracy" else f"{row[q]:.3f}"
            dq = row[q] - base[q]
            delta = f"{100 * dq:+.1f} pt" if q == "accuracy" else f"{dq:+.3f}"
            lines.append(
                f"| {family} | {p} | {qname} {quality} | {delta} | {100 * row['same_as_fp32']:.1f}% | "
                f"{row[thr]:,.0f} {thr_unit} | {row[thr] / base[thr]:.2f}x | {row[lat]:,.1f} {lat_unit} | "
                f"{(base[lat] / row[lat] if lat == 'latency_ms' else row[lat] / base[lat]):.2f}x | "
                f"{row['weights_mb']:.1f} |"
            )
    lm = report["families"].get("lm")
    if lm is not None and lm["rows"]["fp32"].get("generate_compiled_tokens_per_s"):
        base = lm["rows"]["fp32"]["generate_tokens_per_s"]
        parts = [
            f"{p} {row['generate_compiled_tokens_per_s']:,.1f} tok/s ({row['generate_compiled_tokens_per_s'] / base:.2f}x "
            f"fp32 without; same text: {'yes' if row.get('same_text_compiled') else 'no'})"
            for p, row in lm["rows"].items()
            if row.get("generate_compiled_tokens_per_s")
        ]
        lines += [
            "",
            "LM generation with `compile=True` (`tformer generate --compile`): " + ", ".join(parts) + ".",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--translation", help="a translation checkpoint (default: trained here, briefly)")
    parser.add_argument("--classification", help="a classification checkpoint (default: SST-2, briefly)")
    parser.add_argument("--lm", help="a language-model checkpoint (default: Tiny Shakespeare, briefly)")
    for family, what in (
        ("translation", "test TSV or SOURCE TARGET files"),
        ("classification", "labelled dev file"),
        ("lm", "validation text"),
    ):
        parser.add_argument(
            f"--{family}-data", nargs="+", default=[], help=f"{what} (default: from the checkpoint's config)"
        )
    parser.add_argument("--families", default="translation,classification,lm")
    parser.add_argument("--out", default="runs/quantization", help="where quick training runs go")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/quantization.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-sentences", type=int, default=1000, help="translation: test sentences decoded")
    parser.add_argument("--train-scale", type=float, default=1.0, help="multiply the quick runs' steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    from tformer.allocator import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: the library no longer sets it inside Trainer.fit
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    out = Path(args.out)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": " ".join(
            x for x in (platform.machine(), platform.processor(), f"{os.cpu_count()} cores") if x
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
        "families": {},
        "trained_here": {},
    }
    scale = args.train_scale
    for family in args.families.split(","):
        given = getattr(args, family)
        if given:
            path = Path(given)
        else:
            print(f"[{family}] no checkpoint given: training one briefly", file=sys.stderr)
            t0 = time.perf_counter()
            if family == "translation":
                path = train_translation(out, scale)
                note = f"demo task and model, {max(1, round(2 * scale))} epochs (the demo trains 5)"
            elif family == "classification":
                steps = max(1, round(300 * scale))
                path = train_from_config("classification", "configs/sst2.toml", steps, out)
                note = f"configs/sst2.toml, {steps} steps (the config trains 900)"
            else:
                steps = max(1, round(600 * scale))
                path = train_from_config("lm", "configs/shakespeare_char.toml", steps, out)
                note = f"configs/shakespeare_char.toml, {steps} iterations (the config trains 2000)"
            report["trained_here"][family] = {"note": note, "seconds": time.perf_counter() - t0}
        print(f"[{family}] measuring {path}", file=sys.stderr)
        if family == "translation":
            report["families"][family] = bench_translation(
                path, args.repeats, args.max_sentences, args.translation_data
            )
        elif family == "classification":
            report["families"][family] = bench_classification(path, args.repeats, args.classification_data)
        else:
            report["families"][family] = bench_lm(path, args.repeats, args.lm_data)
    report["load_average_end"] = os.getloadavg()[0]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(
        f"\n{report['machine']}, torch {report['torch']}, {report['threads']} threads; load average "
        f"{report['load_average_start']:.1f} at the start, {report['load_average_end']:.1f} at the end"
    )
    for family, info in report["trained_here"].items():
        print(f"{family}: trained here ({info['note']}, {info['seconds']:.0f} s)")
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
