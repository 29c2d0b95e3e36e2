"""The small, resumable translation run that the resume tests interrupt, repeat and continue, in this
process and in fresh ones (`python -c "from support.jobs import run_job; ..."`, with tests/ on sys.path)."""

import os
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tformer.config import Seq2SeqConfig, TrainConfig
from tformer.data.synthetic import number_translation
from tformer.data.tokenizers import Tokenizer
from tformer.models import Seq2Seq
from tformer.tasks import TranslationTask
from tformer.training import Trainer

TESTS = Path(__file__).resolve().parents[1]
"""The folder to put on a fresh process's sys.path so that it can import `support`."""


def run_job(
    out_dir: str,
    max_steps: int,
    resume: bool = False,
    interrupt_at: int | None = None,
    signal_at: int | None = None,
    *,
    sig: int = signal.SIGINT,
    nan_at: tuple[int, ...] = (),
    abort_after_update_at: int | None = None,
    overwrite: bool = False,
    **train_kw: Any,
) -> Trainer:
    """A small, deterministic translation run with dropout; imported by the fresh-process half of the test.

    Faults, at the 0-based step given: `interrupt_at` raises KeyboardInterrupt before the forward pass,
    `signal_at` sends `sig` to the process in the middle of the step, `nan_at` makes the loss NaN,
    `abort_after_update_at` raises KeyboardInterrupt right after the optimiser's update (a second signal
    arriving then). `train_kw`: TrainConfig changes."""
    splits = number_translation(400, 20, 0, seed=1, max_digits=3)
    pairs = {k: [(p.src, p.tgt) for p in v] for k, v in splits.items()}
    src_tok = Tokenizer.train([s for s, _ in pairs["train"]])
    tgt_tok = Tokenizer.train([t for _, t in pairs["train"]])
    mc = Seq2SeqConfig(
        src_vocab_size=src_tok.vocab_size,
        tgt_vocab_size=tgt_tok.vocab_size,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_layers=1,
        dropout=0.2,
        max_seq_len=24,
    )
    tc = TrainConfig(
        epochs=100, max_steps=max_steps, batch_tokens=400, lr=1e-3, warmup_steps=5, log_every=3, seed=7
    )
    torch.manual_seed(123)
    model = Seq2Seq(mc)
    task = TranslationTask(mc, tc, src_tok, tgt_tok, pairs["train"], pairs["valid"], eval_max_sentences=5)
    real_loss = task.loss

    def loss(model, batch):
        if trainer.state.step == interrupt_at:
            raise KeyboardInterrupt  # an exception inside a step, before the update
        if trainer.state.step == signal_at:
            os.kill(os.getpid(), sig)  # Ctrl-C / SIGTERM arriving in the middle of a step
        value = real_loss(model, batch)
        if trainer.state.step in nan_at:
            return value._replace(total=value.total * float("nan"))
        return value

    task.loss = loss
    trainer = Trainer(
        model, task, tc.replace(**train_kw), out_dir=out_dir, progress=False, overwrite=overwrite
    )
    if abort_after_update_at is not None:
        real_step = trainer.optimizer.step

        def step(*args, **kwargs):
            real_step(*args, **kwargs)
            if trainer.state.step == abort_after_update_at:
                raise KeyboardInterrupt

        trainer.optimizer.step = step  # type: ignore[method-assign]
    if resume:
        trainer.resume()
    trainer.fit()
    return trainer


def weights_of(out_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / "checkpoint" / "model.safetensors"))
