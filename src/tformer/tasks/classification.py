"""Classification: labelled text -> Classifier; cross-entropy; accuracy and macro-F1; label + probability
prediction from a checkpoint.

Each text becomes [BOS] + its tokens, cut to max_seq_len (the count of cut texts is printed); BOS is the
[CLS] position that "cls" pooling reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from tformer.config import ClassifierConfig, ConfigError, RunConfig, TrainConfig
from tformer.data.batching import bucket_batches, pad
from tformer.data.readers import read_labelled, report_skipped
from tformer.data.tokenizers import Tokenizer
from tformer.families.roles import EvalRequest
from tformer.inference.modes import evaluating
from tformer.metrics import accuracy, macro_f1
from tformer.models import build_model
from tformer.models.classifier import Classifier
from tformer.tasks.common import CheckpointPredictor, log, model_device, one, progress, tokenizer
from tformer.training.checkpoint import CheckpointError
from tformer.training.trainer import LossValue

if TYPE_CHECKING:
    from tformer.viz.attention import AttentionMaps

TOKENIZER = "tokenizer.json"


@dataclass
class LabelBatch:
    ids: torch.Tensor  # (B, T), BOS first, padded
    labels: torch.Tensor  # (B,)

    def to(self, device: torch.device) -> LabelBatch:
        return LabelBatch(self.ids.to(device), self.labels.to(device))


def encode_texts(tok: Tokenizer, texts: Sequence[str], max_len: int, what: str) -> list[list[int]]:
    rows = [[tok.bos_id, *ids] for ids in tok.encode_batch(list(texts))]
    cut = sum(len(r) > max_len for r in rows)
    if cut:
        log(f"{what}: cut {cut} of {len(rows)} texts to max_seq_len = {max_len} tokens")
    return [r[:max_len] for r in rows]


def class_probabilities(
    model: Classifier, rows: list[list[int]], batch_size: int = 256, *, show_progress: bool = True
) -> torch.Tensor:
    """Encoded texts -> probabilities (N, n_classes), in input order (batched by length); in eval mode,
    without writing to a model already in it (tformer.inference.modes). `show_progress=False`: no
    progress bar even on a terminal (a server calls this per batch)."""
    with evaluating(model), torch.no_grad():
        return _class_probabilities(model, rows, batch_size, show_progress)


def _class_probabilities(
    model: Classifier, rows: list[list[int]], batch_size: int, show_progress: bool
) -> torch.Tensor:
    device = model_device(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), model.config.n_classes)
    starts = range(0, len(order), batch_size)
    for start in progress(starts, len(starts), "classifying") if show_progress else starts:
        idx = order[start : start + batch_size]
        ids = pad([rows[i] for i in idx], model.config.pad_id).to(device)
        out[idx] = model.probabilities(ids).cpu()
    return out


class ClassificationTask:
    name = "classification"

    def __init__(
        self,
        model_config: ClassifierConfig,
        train_config: TrainConfig,
        tokenizer: Tokenizer,
        labels: Sequence[str],
        train: Sequence[tuple[str, str]],
        valid: Sequence[tuple[str, str]],
    ) -> None:
        self.model_config, self.train_config, self.tok = model_config, train_config, tokenizer
        self.labels = list(labels)
        index = {label: i for i, label in enumerate(self.labels)}
        n = model_config.max_seq_len
        self.train_ids = encode_texts(tokenizer, [t for t, _ in train], n, "train")
        self.train_y = [index[y] for _, y in train]
        self.valid_ids = encode_texts(tokenizer, [t for t, _ in valid], n, "valid")
        self.valid_y = [index[y] for _, y in valid]
        self.example = valid[0][0] if valid else None  # the text whose attention the logs draw

    def _batch(self, idx: list[int], ids: list[list[int]], ys: list[int]) -> LabelBatch:
        return LabelBatch(pad([ids[i] for i in idx], self.tok.pad_id), torch.tensor([ys[i] for i in idx]))

    def train_batches(self, epoch: int) -> list[LabelBatch]:
        c = self.train_config
        groups = bucket_batches(
            [len(r) for r in self.train_ids],
            batch_tokens=c.batch_tokens,
            max_sentences=c.max_batch_sentences,
            seed=c.seed + epoch,
        )
        return [self._batch(g, self.train_ids, self.train_y) for g in groups]

    def loss(self, model: Classifier, batch: LabelBatch) -> LossValue:
        batch = batch.to(model_device(model))
        logits = model(batch.ids).logits
        loss = F.cross_entropy(
            logits.float(), batch.labels, reduction="sum", label_smoothing=self.train_config.label_smoothing
        )
        return LossValue(loss, batch.labels.numel(), batch.ids.numel())

    def evaluate(self, model: Classifier) -> dict[str, float]:
        probs = class_probabilities(model, self.valid_ids)
        y = torch.tensor(self.valid_y)
        nll = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
        pred = probs.argmax(-1).tolist()
        return {
            "valid_nll": nll,
            "accuracy": accuracy(pred, self.valid_y),
            "macro_f1": macro_f1(pred, self.valid_y, len(self.labels)),
        }

    def attention_maps(self, model: Classifier) -> AttentionMaps | None:
        """The first validation text's self-attention (for the logs)."""
        from tformer.viz.attention import classifier_maps

        if self.example is None or not self.example.strip():
            return None
        return classifier_maps(TextClassifier(model, self.tok, self.labels), self.example)

    def checkpoint_config(self) -> dict[str, object]:
        return {"task": self.name, "model": self.model_config.to_dict(), "labels": self.labels}

    def write_files(self, directory: Path) -> None:
        self.tok.save(directory / TOKENIZER)


class TextClassifier(CheckpointPredictor):
    """A trained classifier with its tokenizer and label names: text in, (label, probability) out
    (`load`: tasks/common.py)."""

    family = "classification"

    def __init__(self, model: Classifier, tokenizer: Tokenizer, labels: Sequence[str]) -> None:
        self.model, self.tok, self.labels = model.eval(), tokenizer, list(labels)

    @classmethod
    def from_checkpoint(cls, path: Path, raw: Mapping[str, object], model: torch.nn.Module) -> TextClassifier:
        # a baseline (models/rnn.py, models/cnn.py) has the same interface
        classifier = cast(Classifier, model)
        labels, n_classes = raw.get("labels"), classifier.config.n_classes
        if not isinstance(labels, list) or len(labels) != n_classes:
            raise CheckpointError(f"{path / 'config.json'}: 'labels' must list the {n_classes} class names")
        return cls(classifier, Tokenizer.load(path / TOKENIZER), labels)

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        for n, text in enumerate(texts, 1):
            if not text.strip():
                raise ValueError(f"input {n} is empty: nothing to classify")
        rows = encode_texts(self.tok, texts, self.model.config.max_seq_len, "input")
        return class_probabilities(self.model, rows)

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        probs = self.probabilities(texts)
        best = probs.argmax(-1)
        return [(self.labels[int(i)], float(probs[n, i])) for n, i in enumerate(best)]


def build(config: RunConfig, saved: Path | None = None) -> tuple[ClassificationTask, torch.nn.Module]:
    """`tformer train classification`: labelled files -> tokenizer (or `train.init_from`'s pretrained one,
    architecture and encoder weights) -> task and model. `saved`: a checkpoint being resumed."""
    d = config.data
    (train_path,) = one(config, "train")
    (valid_path,) = one(config, "valid")
    train_rows, stats = read_labelled(train_path, text_column=d.text_column, label_column=d.label_column)
    report_skipped(stats)
    labels = sorted({y for _, y in train_rows})
    if len(labels) < 2:
        raise ConfigError(f"{train_path}: found only the label(s) {labels}; a classifier needs at least two")
    valid_rows, vstats = read_labelled(
        valid_path, text_column=d.text_column, label_column=d.label_column, labels=labels
    )
    report_skipped(vstats)
    log(
        f"classification: {len(train_rows):,} training and {len(valid_rows):,} validation texts, labels {labels}"
    )
    from tformer.interop.init_from import run_start

    start = run_start(config)  # train.init_from: its tokenizer, architecture and encoder weights
    if start is not None:
        tok, model_config = start.tokenizer, start.model_config(config.model, n_classes=len(labels))
        log(f"init_from {config.train.init_from}: vocabulary {tok.vocab_size:,}")
    else:
        tok = tokenizer(saved, TOKENIZER, (t for t, _ in train_rows), config)
        log(f"tokenizer: {d.tokenizer}, vocabulary {tok.vocab_size:,}")
        model_config = config.model.replace(
            vocab_size=tok.vocab_size, n_classes=len(labels), pad_id=tok.pad_id
        )
    task = ClassificationTask(model_config, config.train, tok, labels, train_rows, valid_rows)
    return task, start.build(model_config) if start is not None else build_model(model_config)


def evaluate_files(path: Path, data: list[str], request: EvalRequest) -> dict[str, object]:
    """`tformer eval` of a classifier: accuracy and macro-F1 on one labelled file (columns as trained
    unless the request names others)."""
    predictor = TextClassifier.load(path, precision=request.precision, accel=request.accel)
    if len(data) != 1:
        raise ConfigError(f"classification: --data takes one file, got {len(data)}")
    rows, stats = read_labelled(
        data[0],
        text_column=request.text_column or request.trained.text_column,
        label_column=request.label_column or request.trained.label_column,
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
