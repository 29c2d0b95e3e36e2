"""Tasks: which model, which batches, which loss and metrics, how to predict. The trainer and CLI stay
generic; `load_predictor` opens any checkpoint as the right predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tformer.tasks.classification import ClassificationTask, TextClassifier
from tformer.tasks.lm import LanguageModelTask, TextGenerator
from tformer.tasks.translation import TranslationTask, Translator
from tformer.training import run_dir
from tformer.training.checkpoint import CheckpointError, read_config

PREDICTORS: dict[str, Any] = {
    "translation": Translator,
    "classification": TextClassifier,
    "lm": TextGenerator,
}


def load_predictor(
    path: str | Path, *, device: str = "cpu", precision: str = "fp32", accel: bool = False
) -> Translator | TextClassifier | TextGenerator:
    """Any checkpoint -> its task's predictor, the model in `precision` ("fp32", "bf16", "int8"), with
    tformer.accel's kernels when `accel`."""
    path = run_dir.resolve(path)  # a run's `checkpoint` link (or the run directory): its latest save
    task = read_config(path).get("task")
    if task == "encoder":  # written by `tformer import hf` from a BERT model: no head to predict with
        raise CheckpointError(
            f"{path}: an encoder checkpoint (no task head); train a classifier from it with "
            f"`tformer train classification ... train.init_from={path}`"
        )
    if task not in PREDICTORS:
        raise CheckpointError(
            f"{path}: unknown task {task!r} in config.json; expected one of {', '.join(PREDICTORS)}"
        )
    return PREDICTORS[task].load(path, device=device, precision=precision, accel=accel)


__all__ = [
    "ClassificationTask",
    "LanguageModelTask",
    "TextClassifier",
    "TextGenerator",
    "TranslationTask",
    "Translator",
    "load_predictor",
]
