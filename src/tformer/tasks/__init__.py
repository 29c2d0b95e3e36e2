"""Tasks: which model, which batches, which loss and metrics, how to predict. The trainer and CLI stay
generic; `open_predictor` opens any checkpoint as its family's predictor (tformer.families)."""

from __future__ import annotations

from pathlib import Path

from tformer import families
from tformer.families.roles import Predictor
from tformer.tasks.classification import ClassificationTask, TextClassifier
from tformer.tasks.lm import LanguageModelTask, TextGenerator
from tformer.tasks.translation import TranslationTask, Translator
from tformer.training import run_dir
from tformer.training.checkpoint import CheckpointError, read_config


def checkpoint_family(path: Path) -> families.Family:
    """The family of a checkpoint directory's config.json `task`; clear errors for the others."""
    task = read_config(path).get("task")
    if task == "encoder":  # written by `tformer import hf` from a BERT model: no head to predict with
        raise CheckpointError(
            f"{path}: an encoder checkpoint (no task head); train a classifier from it with "
            f"`tformer train classification ... train.init_from={path}`"
        )
    if not isinstance(task, str) or task not in families.FAMILIES:
        raise CheckpointError(
            f"{path}: unknown task {task!r} in config.json; expected one of {', '.join(families.names())}"
        )
    return families.get(task)


def open_predictor(
    path: str | Path, *, device: str = "cpu", precision: str = "fp32", accel: bool = False
) -> Predictor:
    """Any family's checkpoint -> its predictor, the model in `precision` ("fp32", "bf16", "int8"), with
    tformer.accel's kernels when `accel`."""
    path = run_dir.resolve(path, say=True)  # a run directory: its best checkpoint if kept, else its latest
    cls = checkpoint_family(path).predictor_class()
    return cls.load(path, device=device, precision=precision, accel=accel)


def load_predictor(
    path: str | Path, *, device: str = "cpu", precision: str = "fp32", accel: bool = False
) -> Translator | TextClassifier | TextGenerator:
    """`open_predictor` for the three built-in families, typed as their union (what viz dispatches on)."""
    predictor = open_predictor(path, device=device, precision=precision, accel=accel)
    if not isinstance(predictor, (Translator, TextClassifier, TextGenerator)):
        raise TypeError(f"{path}: a {type(predictor).__name__}; load_predictor opens the built-in families")
    return predictor


__all__ = [
    "ClassificationTask",
    "LanguageModelTask",
    "TextClassifier",
    "TextGenerator",
    "TranslationTask",
    "Translator",
    "load_predictor",
    "open_predictor",
]
