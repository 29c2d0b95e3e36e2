"""Claim: at the same training cost the Transformer reaches better quality than recurrent models
(Vaswani et al., 2017, table 2: better BLEU "at a fraction of the training cost").

Measured with tformer's own pipeline (`tformer train` with `model.architecture`): each model trains for
the same wall-clock budget (`train.max_time`) on Multi30k German -> English (BLEU, greedy, on validation
sentences) and on SST-2 (accuracy on the dev set; with the CNN of Kim, 2014, as a third model). When the
corpora are absent, generated stand-ins of the same kind are used and the output says so.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, TypedDict

from tformer.config import RunConfig
from tformer.experiments.common import Result, Table, data_dir, line_plot

CLAIM = (
    "The Transformer reaches better translation quality than recurrent models at a fraction of their "
    "training cost (Vaswani et al., 2017, section 6.1 and table 2)."
)


class Settings(TypedDict):
    budget: float  # seconds of training per model (train.max_time)
    eval_every: int | None
    eval_sentences: int
    subset: int | None  # the first this many training pairs / phrases (None: all)
    batch_tokens: int


SETTINGS: dict[str, Settings] = {
    "quick": {"budget": 4.0, "eval_every": None, "eval_sentences": 50, "subset": 3000, "batch_tokens": 600},
    "medium": {
        "budget": 90.0,
        "eval_every": 60,
        "eval_sentences": 200,
        "subset": None,
        "batch_tokens": 3000,
    },
    "full": {"budget": 300.0, "eval_every": 300, "eval_sentences": 300, "subset": None, "batch_tokens": 3000},
}
# [model] and [data] sections of a RunConfig
TRANSLATION_MODELS: dict[str, dict[str, object]] = {
    "Transformer": {"d_model": 256, "n_heads": 8, "d_ff": 1024, "n_layers": 3, "dropout": 0.1},
    "LSTM": {"architecture": "lstm", "d_model": 256, "n_layers": 2, "dropout": 0.2},
}
CLASSIFIER_MODELS: dict[str, dict[str, object]] = {
    "Transformer": {
        "d_model": 256,
        "n_heads": 4,
        "d_ff": 1024,
        "n_layers": 2,
        "dropout": 0.3,
        "pooling": "mean",
    },
    "LSTM": {"architecture": "lstm", "d_model": 256, "n_layers": 1, "dropout": 0.3},
    "CNN": {"architecture": "cnn", "d_model": 256, "dropout": 0.5},
}
POSITIVE = ["good", "great", "fine", "lovely", "superb", "moving", "funny", "charming", "clever", "brilliant"]
QUICK_MODEL = {"d_model": 64, "d_ff": 256, "n_layers": 1, "cnn_filters": 16}
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "tedious", "clumsy", "stale", "flat", "lifeless"]
NEUTRAL = [
    "the",
    "film",
    "movie",
    "story",
    "plot",
    "actors",
    "it",
    "was",
    "is",
    "a",
    "an",
    "and",
    "of",
    "this",
    "that",
    "with",
    "its",
    "cast",
    "script",
    "ending",
]


def _generated_sentiment(path: Path, n: int, seed: int) -> None:
    """Neutral words with sentiment words; 'not' flips one. Label: the sign of the sentiment sum."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    while len(lines) <= n:
        words = rng.choices(NEUTRAL, k=rng.randint(4, 14))
        score = 0
        for _ in range(rng.randint(1, 3)):
            good = rng.random() < 0.5
            negated = rng.random() < 0.25
            score += (1 if good else -1) * (-1 if negated else 1)
            words.insert(
                rng.randrange(len(words) + 1),
                ("not " if negated else "") + rng.choice(POSITIVE if good else NEGATIVE),
            )
        if score:
            lines.append(f"{' '.join(words)}\t{int(score > 0)}")
    path.write_text("\n".join(lines) + "\n")


def _data(out: Path, size: str) -> tuple[dict[str, object], dict[str, object], list[str]]:
    """Data sections for translation and classification, and notes saying which data they are."""
    notes = []
    sub = SETTINGS[size]["subset"]
    gen = out / "data"
    gen.mkdir(parents=True, exist_ok=True)
    mt: dict[str, object]
    cl: dict[str, object]
    mt_root = data_dir("multi30k", "train.de.gz", "train.en.gz", "val.de.gz", "val.en.gz")
    sst_root = data_dir("sst2", "train_full.tsv", "dev.tsv")
    if mt_root is not None:
        mt = {
            "train": ["{data}/multi30k/train.de.gz", "{data}/multi30k/train.en.gz"],
            "valid": ["{data}/multi30k/val.de.gz", "{data}/multi30k/val.en.gz"],
            "tokenizer": "bpe",
            "vocab_size": 8000,
        }
        notes.append("Translation: Multi30k de->en (29,000 training pairs), BPE 8,000 shared.")
        if sub:
            from tformer.data.readers import read_parallel

            pairs, _ = read_parallel([mt_root / "train.de.gz", mt_root / "train.en.gz"])
            (gen / "mt_train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs[:sub]))
            mt = {**mt, "train": [str(gen / "mt_train.tsv")], "vocab_size": 2000}
            notes[-1] = f"Translation: the first {sub:,} pairs of Multi30k de->en, BPE 2,000 shared."
    else:
        from tformer.data.synthetic import number_translation

        splits = number_translation(sub or 20000, 300, 1)
        for split in ("train", "valid"):
            (gen / f"mt_{split}.tsv").write_text("".join(f"{p.src}\t{p.tgt}\n" for p in splits[split]))
        mt = {"train": [str(gen / "mt_train.tsv")], "valid": [str(gen / "mt_valid.tsv")], "tokenizer": "word"}
        notes.append(
            "Translation: generated French -> English number words (Multi30k not found under $TFORMER_DATA)."
        )
    if sst_root is not None:
        cl = {
            "train": ["{data}/sst2/train_full.tsv"],
            "valid": ["{data}/sst2/dev.tsv"],
            "text_column": "sentence",
            "label_column": "label",
            "tokenizer": "word",
            "vocab_size": 16000,
        }
        notes.append(
            "Classification: SST-2 (67,349 training phrases, 872 dev sentences), word vocabulary 16,000."
        )
        if sub:
            lines = (sst_root / "train_full.tsv").read_text().splitlines()
            (gen / "sst_train.tsv").write_text("\n".join(lines[: sub + 1]) + "\n")
            cl = {**cl, "train": [str(gen / "sst_train.tsv")]}
            notes[-1] = f"Classification: the first {sub:,} SST-2 training phrases, dev set."
    else:
        _generated_sentiment(gen / "sst_train.tsv", sub or 20000, 0)
        _generated_sentiment(gen / "sst_valid.tsv", 500, 1)
        cl = {
            "train": [str(gen / "sst_train.tsv")],
            "valid": [str(gen / "sst_valid.tsv")],
            "text_column": "sentence",
            "label_column": "label",
            "tokenizer": "word",
        }
        notes.append(
            "Classification: generated sentiment sentences with negation (SST-2 not found under $TFORMER_DATA)."
        )
    return mt, cl, notes


def _train(
    task: str, model: dict[str, object], data: dict[str, object], train: dict[str, object], out: Path
) -> list[dict[str, Any]]:
    from tformer.pipeline import train as run_training

    config = RunConfig.from_dict({"task": task, "model": model, "train": train, "data": data})
    return run_training(
        config, out, overwrite=True, progress=False, accel=True
    ).history  # reruns replace its own


def run(out: Path, size: str) -> Result:
    s = SETTINGS[size]
    mt_data, cl_data, notes = _data(out, size)
    common: dict[str, object] = {
        "epochs": 1000,
        "max_time": s["budget"],
        "eval_every_steps": s["eval_every"],
        "eval_every_epochs": 1000,  # evaluate by steps and at the end only
        "log_every": 10,
        "seed": 0,
    }
    histories: dict[str, dict[str, list[dict[str, Any]]]] = {"translation": {}, "classification": {}}

    def small(model: dict[str, object]) -> dict[str, object]:
        """--quick: the same kinds of model, small (seconds of training only check that everything runs)."""
        if size != "quick":
            return model
        return {**model, "d_model": QUICK_MODEL["d_model"], "n_layers": QUICK_MODEL["n_layers"]} | (
            {"d_ff": QUICK_MODEL["d_ff"]} if "d_ff" in model else {}
        )

    for name, model in TRANSLATION_MODELS.items():
        model = small(model)
        train = {
            **common,
            "batch_tokens": s["batch_tokens"],
            "lr": 1e-3,
            "warmup_steps": 400,
            "eval_max_sentences": s["eval_sentences"],
        }
        histories["translation"][name] = _train(
            "translation",
            {**model, "max_seq_len": 128, "share_embeddings": True},
            mt_data,
            train,
            out / "runs" / f"mt_{name}",
        )
    for name, model in CLASSIFIER_MODELS.items():
        model = small(model)
        if model.get("architecture") == "cnn" and size == "quick":
            model = {**model, "cnn_filters": QUICK_MODEL["cnn_filters"]}
        train = {**common, "batch_tokens": s["batch_tokens"], "lr": 1e-3, "warmup_steps": 300}
        histories["classification"][name] = _train(
            "classification", {**model, "max_seq_len": 64}, cl_data, train, out / "runs" / f"cl_{name}"
        )

    def final(task: str, name: str) -> dict[str, Any]:
        return [r for r in histories[task][name] if r["type"] == "eval"][-1]

    result = Result("versus-rnn", CLAIM, size)
    result.notes = [
        *notes,
        f"Equal budget: {s['budget']:.0f} s of training time per model (train.max_time; evaluation not "
        "counted), Adam lr 1e-3 with warm-up and inverse-sqrt decay, batches of about 3,000 tokens.",
        "Translation models: Transformer 3+3 layers, d_model 256, 8 heads, d_ff 1024; LSTM: 2-layer "
        "bidirectional encoder, 2-layer decoder with additive attention, d_model 256. BLEU: sacrebleu, greedy, "
        f"first {s['eval_sentences']} validation sentences.",
        "Classifiers: Transformer 2 layers, d_model 256, mean pooling; BiLSTM-max, d_model 256; CNN widths "
        "3/4/5 x 100 filters (Kim, 2014).",
        "On a shared CPU the steps done within the budget depend on contention at the time of the run.",
    ]
    mt_rows: list[list[object]] = []
    cl_rows: list[list[object]] = []
    translation: dict[str, dict[str, object]] = {}
    classification: dict[str, dict[str, object]] = {}
    for name in TRANSLATION_MODELS:
        r = final("translation", name)
        translation[name] = {k: r[k] for k in ("step", "time", "bleu", "valid_nll", "exact_match")}
        mt_rows.append([name, r["step"], r["time"], r["bleu"], r["valid_nll"]])
    for name in CLASSIFIER_MODELS:
        r = final("classification", name)
        classification[name] = {k: r[k] for k in ("step", "time", "accuracy", "valid_nll")}
        cl_rows.append([name, r["step"], r["time"], r["accuracy"], r["valid_nll"]])
    result.numbers = {
        "budget_seconds": s["budget"],
        "translation": translation,
        "classification": classification,
    }
    result.tables.append(
        Table(
            "Translation at equal training time", ["model", "steps", "train s", "BLEU", "valid NLL"], mt_rows
        )
    )
    result.tables.append(
        Table(
            "Sentiment classification at equal training time",
            ["model", "steps", "train s", "accuracy", "valid NLL"],
            cl_rows,
        )
    )

    def curve(task: str, key: str) -> dict[str, tuple[list[float], list[float]]]:
        return {
            name: ([r["time"] for r in h if r["type"] == "eval"], [r[key] for r in h if r["type"] == "eval"])
            for name, h in histories[task].items()
        }

    def train_curve(task: str) -> dict[str, tuple[list[float], list[float]]]:
        return {
            name: (
                [r["time"] for r in h if r["type"] == "train" and "loss" in r],
                [r["loss"] for r in h if r["type"] == "train" and "loss" in r],
            )
            for name, h in histories[task].items()
        }

    result.plots.append(
        line_plot(
            out / "versus_rnn.png",
            [
                {
                    "series": train_curve("translation"),
                    "xlabel": "training seconds",
                    "ylabel": "training loss",
                    "title": "translation: training loss",
                },
                {
                    "series": curve("translation", "bleu"),
                    "xlabel": "training seconds",
                    "ylabel": "BLEU (greedy)",
                    "title": "translation: validation BLEU",
                },
                {
                    "series": curve("classification", "accuracy"),
                    "xlabel": "training seconds",
                    "ylabel": "accuracy",
                    "title": "sentiment: dev accuracy",
                },
            ],
            title=f"equal wall-clock budget: {s['budget']:.0f} s of training each",
        )
    )
    return result
