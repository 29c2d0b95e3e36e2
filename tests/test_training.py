"""Training: exact resume (also across processes and after Ctrl-C), schedules, label smoothing, checkpoints."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tformer.config import ModelConfig, TrainConfig
from tformer.data.synthetic import number_translation
from tformer.data.tokenizers import Tokenizer
from tformer.models import Seq2Seq
from tformer.tasks import TranslationTask
from tformer.training import Trainer, sequence_cross_entropy
from tformer.training.checkpoint import load_trainer_state
from tformer.training.schedules import cosine, inverse_sqrt, peak_lr

HERE = Path(__file__).parent


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
    mc = ModelConfig(
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


def _weights(out_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / "checkpoint" / "model.safetensors"))


def test_resume_in_fresh_process_is_exact(tmp_path):
    n = 16  # the 400 pairs make ~10 batches per epoch: the halves cross an epoch boundary mid-way
    run_job(str(tmp_path / "straight"), n)
    run_job(str(tmp_path / "halves"), n // 2 + 1)
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); from test_training import run_job; "
        f"run_job({str(tmp_path / 'halves')!r}, {n}, resume=True)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "halves")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ... and they really trained: parameters moved away from the initialisation.
    run_job(str(tmp_path / "one"), 1)
    assert not torch.equal(
        a["encoder.layers.0.ff.linear1.weight"],
        _weights(tmp_path / "one")["encoder.layers.0.ff.linear1.weight"],
    )


def test_interrupt_saves_and_resume_is_exact(tmp_path):
    n = 12
    run_job(str(tmp_path / "straight"), n)
    with pytest.raises(KeyboardInterrupt):
        run_job(str(tmp_path / "cut"), n, interrupt_at=5)
    run_job(str(tmp_path / "cut"), n, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logged = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert any('"type": "eval"' in line for line in logged)


def test_ctrl_c_mid_step_finishes_the_step_then_saves(tmp_path):
    n = 12
    run_job(str(tmp_path / "straight"), n)
    with pytest.raises(KeyboardInterrupt):
        run_job(str(tmp_path / "cut"), n, signal_at=4)
    state = load_trainer_state(tmp_path / "cut" / "checkpoint")
    assert (
        state["trainer"]["step"] == 5
    )  # the step that was running when Ctrl-C came was completed and counted
    run_job(str(tmp_path / "cut"), n, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_directory_contents(tmp_path):
    run_job(str(tmp_path), 2)
    link = tmp_path / "checkpoint"
    assert link.is_symlink() and os.readlink(link) == "checkpoint-2"  # relative: the run moves as a whole
    names = sorted(p.name for p in link.iterdir())
    assert names == [
        "config.json",
        "model.safetensors",
        "src_tokenizer.json",
        "tgt_tokenizer.json",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tformer-run.json",
        ".tformer-run.lock",
        "checkpoint",
        "checkpoint-2",
        "log.jsonl",
    ]  # no temporary directories left behind


def test_inverse_sqrt_schedule_is_the_papers():
    d, warmup = 512, 4000
    peak = peak_lr(None, d, warmup)
    f = inverse_sqrt(warmup)
    for step in (1, 100, 3999, 4000, 10000, 100000):
        paper = d**-0.5 * min(step**-0.5, step * warmup**-1.5)
        assert peak * f(step - 1) == pytest.approx(paper, rel=1e-12)


def test_cosine_schedule_ends_at_floor():
    f = cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1)  # warm-up: step 1 of 10
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(59) == pytest.approx(0.55)
    assert f(109) == pytest.approx(0.1)


def test_label_smoothed_loss_ignores_padding_and_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 0], [3, 0, 0]])
    eps = 0.1
    got = sequence_cross_entropy(logits, targets, pad_id=0, label_smoothing=eps)
    want = 0.0
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        row = logits[b, t]
        logp = row - torch.logsumexp(row, 0)  # float64 throughout
        q = torch.full((5,), eps / 5, dtype=torch.float64)  # eps spread over all V classes ...
        q[targets[b, t]] += 1 - eps  # ... and 1 - eps on the gold one
        want += -(q * logp).sum().item()
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert math.isfinite(got.item())
