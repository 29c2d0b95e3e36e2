"""experiments/training.py: the experiments train through the Trainer, with training.schedules' cosine
warm-up, and read their curves from its history."""

from __future__ import annotations

import json

import pytest
import torch

from tformer.config import LMConfig
from tformer.experiments.training import (
    Point,
    char_lm_batches,
    fit,
    fit_char_lm,
    lm_valid_loss,
    next_token_loss,
)
from tformer.models.lm import LanguageModel
from tformer.training.schedules import cosine


def _lm() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(
        LMConfig(vocab_size=12, d_model=16, n_heads=2, d_ff=32, n_layers=1, dropout=0.0, max_seq_len=8)
    )


def test_fit_char_lm_records_the_trainers_curve_and_schedule(tmp_path):
    ids = torch.arange(600) % 12  # a learnable sequence
    settings = {"batch": 4, "block": 8, "steps": 6, "every": 3}
    model = _lm()
    points = fit_char_lm(model, char_lm_batches(ids, settings), ids, settings, tmp_path / "run", lr=1e-2)
    assert [p.step for p in points] == [3, 6] and all(isinstance(p, Point) for p in points)
    assert not model.training
    # the last point's validation loss is that of the trained model, as the Trainer evaluated it
    assert points[-1].valid_loss == pytest.approx(lm_valid_loss(model, ids, 8), rel=1e-6)
    assert points[-1].train_loss < points[0].train_loss
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    # the learning rate follows training.schedules.cosine (warm-up: a tenth of the steps, at least 1)
    f = cosine(6 // 10, 6, 0.0)
    assert [r["lr"] for r in train] == pytest.approx([1e-2 * f(3), 1e-2 * f(6)])
    assert [r["loss"] for r in train] == pytest.approx([p.train_loss for p in points])
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()


def test_fit_refuses_a_partial_last_point(tmp_path):
    ids = torch.arange(200) % 12
    batches = char_lm_batches(ids, {"batch": 2, "block": 8, "steps": 5, "every": 2})
    with pytest.raises(ValueError, match="not a multiple of every = 2"):
        fit(_lm(), batches, next_token_loss, tmp_path, lr=1e-3, warmup=0, every=2)
