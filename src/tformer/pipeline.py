"""From a RunConfig to a trained checkpoint: read the files, build tokenizers, task and model, train.

`tformer train` and the real-data benchmarks call `train`; it knows the three tasks through their builders.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tformer.config import ConfigError, RunConfig
from tformer.data.readers import read_labelled, read_parallel, read_text, report_skipped
from tformer.data.tokenizers import Tokenizer
from tformer.models import Classifier, build_model
from tformer.tasks import ClassificationTask, LanguageModelTask, TranslationTask
from tformer.tasks.classification import TOKENIZER
from tformer.tasks.translation import SRC_TOKENIZER, TGT_TOKENIZER
from tformer.training import distributed, run_dir
from tformer.training.trainer import Trainer


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, Any]]
    model: torch.nn.Module
    task: Any


def _need(config: RunConfig, key: str) -> list[str]:
    paths = config.data.paths(key)
    if not paths:
        raise ConfigError(f"no {key} data: give --{key} FILE (or data.{key} in the config)")
    return paths


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _tokenizer(saved: Path | None, name: str, texts: Any, config: RunConfig) -> Tokenizer:
    """The tokenizer saved in the checkpoint being resumed, or one trained on the training texts."""
    if saved is not None and (saved / name).exists():
        return Tokenizer.load(saved / name)
    return Tokenizer.train(texts, kind=config.data.tokenizer, vocab_size=config.data.vocab_size)


def build_translation(
    config: RunConfig, saved: Path | None = None
) -> tuple[TranslationTask, torch.nn.Module]:
    d = config.data
    train_pairs, stats = read_parallel(_need(config, "train"))
    report_skipped(stats)
    valid_pairs, vstats = read_parallel(_need(config, "valid"))
    report_skipped(vstats)
    _log(f"translation: {len(train_pairs):,} training pairs, {len(valid_pairs):,} validation pairs")
    if d.shared_vocab:
        src_tok = tgt_tok = _tokenizer(
            saved, SRC_TOKENIZER, (x for pair in train_pairs for x in pair), config
        )
    else:
        src_tok = _tokenizer(saved, SRC_TOKENIZER, (s for s, _ in train_pairs), config)
        tgt_tok = _tokenizer(saved, TGT_TOKENIZER, (t for _, t in train_pairs), config)
    model_config = config.model.replace(
        src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size, pad_id=tgt_tok.pad_id
    )
    if model_config.share_embeddings and not d.shared_vocab:
        raise ConfigError("model.share_embeddings needs data.shared_vocab = true (one vocabulary)")
    _log(
        f"tokenizer: {d.tokenizer}, vocabulary {src_tok.vocab_size:,}"
        + ("" if d.shared_vocab else f" (source) / {tgt_tok.vocab_size:,} (target)")
    )
    task = TranslationTask(
        model_config,
        config.train,
        src_tok,
        tgt_tok,
        train_pairs,
        valid_pairs,
        eval_beam_size=config.train.eval_beam_size,
        eval_max_sentences=config.train.eval_max_sentences,
    )
    return task, build_model(model_config)


def build_classification(
    config: RunConfig, saved: Path | None = None
) -> tuple[ClassificationTask, torch.nn.Module]:
    d = config.data
    (train_path,) = _one(config, "train")
    (valid_path,) = _one(config, "valid")
    train_rows, stats = read_labelled(train_path, text_column=d.text_column, label_column=d.label_column)
    report_skipped(stats)
    labels = sorted({y for _, y in train_rows})
    if len(labels) < 2:
        raise ConfigError(f"{train_path}: found only the label(s) {labels}; a classifier needs at least two")
    valid_rows, vstats = read_labelled(
        valid_path, text_column=d.text_column, label_column=d.label_column, labels=labels
    )
    report_skipped(vstats)
    _log(
        f"classification: {len(train_rows):,} training and {len(valid_rows):,} validation texts, labels {labels}"
    )
    start = None
    if config.train.init_from:  # pretrained: its tokenizer, architecture and encoder weights
        from tformer.interop.init_from import classifier_start

        start = classifier_start(config.train.init_from)
        tok, model_config = start.tokenizer, start.model_config(config.model, n_classes=len(labels))
        _log(f"init_from {config.train.init_from}: vocabulary {tok.vocab_size:,}")
    else:
        tok = _tokenizer(saved, TOKENIZER, (t for t, _ in train_rows), config)
        _log(f"tokenizer: {d.tokenizer}, vocabulary {tok.vocab_size:,}")
        model_config = config.model.replace(
            vocab_size=tok.vocab_size, n_classes=len(labels), pad_id=tok.pad_id
        )
    task = ClassificationTask(model_config, config.train, tok, labels, train_rows, valid_rows)
    model = build_model(model_config)
    if start is not None:
        if not isinstance(model, Classifier):
            raise ConfigError(
                f"train.init_from starts a Transformer classifier; model.architecture is "
                f"{model_config.architecture!r} (use 'transformer' or drop init_from)"
            )
        start.load_into(model)
    return task, model


def build_lm(config: RunConfig, saved: Path | None = None) -> tuple[LanguageModelTask, torch.nn.Module]:
    d = config.data
    (train_path,) = _one(config, "train")
    text = read_text(train_path)
    if config.data.valid:
        (valid_path,) = _one(config, "valid")
        train_text, valid_text = text, read_text(valid_path)
    elif d.valid_fraction > 0:
        cut = int(len(text) * (1 - d.valid_fraction))
        train_text, valid_text = text[:cut], text[cut:]
    else:
        raise ConfigError("no validation text: give --valid FILE or data.valid_fraction (e.g. 0.1)")
    tok = _tokenizer(saved, TOKENIZER, train_text.splitlines(keepends=True), config)
    _log(
        f"lm: {len(train_text):,} training and {len(valid_text):,} validation characters; "
        f"tokenizer {d.tokenizer}, vocabulary {tok.vocab_size:,}"
    )
    model_config = config.model.replace(vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    task = LanguageModelTask(model_config, config.train, tok, train_text, valid_text)
    return task, build_model(model_config)


def _one(config: RunConfig, key: str) -> list[str]:
    paths = _need(config, key)
    if len(paths) != 1:
        raise ConfigError(f"{config.task}: --{key} takes one file, got {len(paths)}: {paths}")
    return paths


BUILDERS: dict[str, Any] = {
    "translation": build_translation,
    "classification": build_classification,
    "lm": build_lm,
}


def train(
    config: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    accel: bool = False,
) -> TrainResult:
    """Train `config.task` on `config.data`; checkpoints and log.jsonl go to `out_dir` (run_dir.py). Under
    torchrun every process builds the same task and model; only rank 0 prints.

    `resume`: continue the run in `out_dir` from its latest checkpoint (from scratch, saying so, when it
    has none yet). A fresh run into a directory another run wrote needs `overwrite` (which deletes that
    run's checkpoints and log). `accel`: train with tformer.accel's machine-specific kernels (the
    command line's choice; the weights and checkpoints are the same either way)."""
    world = distributed.setup(config.train.device)
    torch.manual_seed(config.train.seed)
    saved = run_dir.latest(out_dir) if resume else None
    with contextlib.nullcontext() if world.is_main else contextlib.redirect_stderr(io.StringIO()):
        task, model = BUILDERS[config.task](config, saved)
        if accel:
            from tformer import accel as _accel

            _accel.apply(model)
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"model: {type(model).__name__}, {n_params / 1e6:.2f}M parameters")
    if world.distributed:
        distributed.check_same(world, _files_digest(task), "the tokenizers built from the training data")
    trainer = Trainer(
        model,
        task,
        config.train,
        out_dir=out_dir,
        progress=progress,
        extra_config={"data": config.data.to_dict()},
        overwrite=overwrite,
    )
    if resume:
        found = trainer.resume()
        if world.is_main and found:
            _log(f"resumed at step {trainer.state.step} (epoch {trainer.state.epoch + 1})")
        elif world.is_main:
            _log(f"--resume: {out_dir} has no checkpoint yet; starting from scratch")
    history = trainer.fit()
    return TrainResult(trainer.checkpoint_dir, history, model, task)


def _files_digest(task: Any) -> str:
    """A digest of the files the task writes into a checkpoint (its tokenizers)."""
    with tempfile.TemporaryDirectory() as tmp:
        task.write_files(Path(tmp))
        return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(Path(tmp).iterdir()))).hexdigest()


def evaluate_checkpoint(
    path: str | Path,
    data: list[str],
    *,
    beam_size: int = 4,
    text_column: str | None = None,
    label_column: str | None = None,
    precision: str = "fp32",
    accel: bool = False,
) -> dict[str, Any]:
    """Score a checkpoint on a file of its task: BLEU / chrF / exact match, accuracy / macro-F1, or
    perplexity, with the model in `precision` ("fp32", "bf16", "int8"). Column names default to the ones
    the model was trained with."""
    from tformer.config import DataConfig
    from tformer.metrics import accuracy, bleu, chrf, exact_match, macro_f1, perplexity
    from tformer.tasks import TextClassifier, TextGenerator, Translator, load_predictor
    from tformer.tasks.lm import mean_nll
    from tformer.training.checkpoint import read_config

    path = run_dir.resolve(path)  # a live run's `checkpoint` link: every file from the same save
    raw = read_config(path)
    trained = DataConfig.from_dict(raw.get("data", {}), source=str(path)) if "data" in raw else DataConfig()
    predictor = load_predictor(path, precision=precision, accel=accel)
    if isinstance(predictor, Translator):
        pairs, stats = read_parallel(data)
        report_skipped(stats)
        limit = predictor.model.config.max_seq_len
        fits = [p for p in pairs if len(predictor.src_tok.encode(p[0])) <= limit]
        if len(fits) < len(pairs):
            _log(
                f"skipped {len(pairs) - len(fits)} of {len(pairs)} sentences longer than max_seq_len = {limit}"
            )
        pairs = fits
        hyps = predictor.translate([s for s, _ in pairs], beam_size=beam_size)
        refs = [t for _, t in pairs]
        score = bleu(hyps, refs)
        return {
            "sentences": len(refs),
            "bleu": score.score,
            "bleu_signature": score.signature,
            "chrf": chrf(hyps, refs),
            "exact_match": exact_match(hyps, refs),
        }
    if isinstance(predictor, TextClassifier):
        if len(data) != 1:
            raise ConfigError(f"classification: --data takes one file, got {len(data)}")
        rows, stats = read_labelled(
            data[0],
            text_column=text_column or trained.text_column,
            label_column=label_column or trained.label_column,
            labels=predictor.labels,
        )
        report_skipped(stats)
        probs = predictor.probabilities([t for t, _ in rows])
        index = {label: i for i, label in enumerate(predictor.labels)}
        gold = [index[y] for _, y in rows]
        pred = probs.argmax(-1).tolist()
        return {
            "texts": len(rows),
            "accuracy": accuracy(pred, gold),
            "macro_f1": macro_f1(pred, gold, len(predictor.labels)),
        }
    assert isinstance(predictor, TextGenerator)
    if len(data) != 1:
        raise ConfigError(f"lm: --data takes one file, got {len(data)}")
    ids = torch.tensor(predictor.tok.encode(read_text(data[0])), dtype=torch.long)
    nll = mean_nll(predictor.model, ids)  # predictors hold their model in eval mode
    return {"tokens": len(ids), "nll": nll, "perplexity": perplexity(nll)}
