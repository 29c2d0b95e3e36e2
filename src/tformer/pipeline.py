"""From a RunConfig to a trained checkpoint: read the files, build tokenizers, task and model, train;
and `evaluate_checkpoint`. Both know the families only through tformer.families (each family's `build`
and `evaluate` entries), so a new family needs no edit here.
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

from tformer import families
from tformer.config import RunConfig
from tformer.training import distributed, lora, run_dir
from tformer.training.trainer import Task, Trainer


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, Any]]
    model: torch.nn.Module
    task: Task


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


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
    command line's choice; the weights and checkpoints are the same either way). train.lora_rank: LoRA
    adapters on train.init_from's weights (training/lora.py), adapter-only checkpoints."""
    world = distributed.setup(config.train.device)
    torch.manual_seed(config.train.seed)
    saved = run_dir.latest(out_dir) if resume else None
    with contextlib.nullcontext() if world.is_main else contextlib.redirect_stderr(io.StringIO()):
        task, model = families.get(config.task).task_builder()(config, saved)
        if config.train.lora:  # adapters on the weights train.init_from loaded; the rest frozen
            lora.adapt(model, config.train, family=config.task)
        if accel:
            from tformer import accel as _accel

            _accel.apply(model)
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"model: {type(model).__name__}, {n_params / 1e6:.2f}M parameters")
        if config.train.lora:
            _log(lora.describe(model))
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


def _files_digest(task: Task) -> str:
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
    """Score a checkpoint on files of its task with its family's evaluation (translation: BLEU / chrF /
    exact match; classification: accuracy / macro-F1; lm: perplexity), the model in `precision` ("fp32",
    "bf16", "int8"). Column names default to the ones the model was trained with."""
    from tformer.config import DataConfig
    from tformer.families.roles import EvalRequest
    from tformer.tasks import checkpoint_family
    from tformer.training.checkpoint import read_config

    path = run_dir.resolve(path, say=True)  # a link, once: every file from the same save
    raw = read_config(path)
    trained = DataConfig.from_dict(raw.get("data", {}), source=str(path)) if "data" in raw else DataConfig()
    request = EvalRequest(trained, beam_size, text_column, label_column, precision, accel)
    return checkpoint_family(path).evaluator()(path, data, request)
