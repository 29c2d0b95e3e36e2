"""Training: exact resume (also across processes and after Ctrl-C), schedules, label smoothing, checkpoints."""

import math
import os
import subprocess
import sys

import pytest
import torch

from support.jobs import TESTS, run_job, weights_of
from tformer.training import sequence_cross_entropy
from tformer.training.checkpoint import load_trainer_state
from tformer.training.schedules import cosine, inverse_sqrt, peak_lr


def test_resume_in_fresh_process_is_exact(tmp_path):
    n = 16  # the 400 pairs make ~10 batches per epoch: the halves cross an epoch boundary mid-way
    run_job(str(tmp_path / "straight"), n)
    run_job(str(tmp_path / "halves"), n // 2 + 1)
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from support.jobs import run_job; "
        f"run_job({str(tmp_path / 'halves')!r}, {n}, resume=True)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    a, b = weights_of(tmp_path / "straight"), weights_of(tmp_path / "halves")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ... and they really trained: parameters moved away from the initialisation.
    run_job(str(tmp_path / "one"), 1)
    assert not torch.equal(
        a["encoder.layers.0.ff.linear1.weight"],
        weights_of(tmp_path / "one")["encoder.layers.0.ff.linear1.weight"],
    )


def test_interrupt_saves_and_resume_is_exact(tmp_path):
    n = 12
    run_job(str(tmp_path / "straight"), n)
    with pytest.raises(KeyboardInterrupt):
        run_job(str(tmp_path / "cut"), n, interrupt_at=5)
    run_job(str(tmp_path / "cut"), n, resume=True)
    a, b = weights_of(tmp_path / "straight"), weights_of(tmp_path / "cut")
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
    a, b = weights_of(tmp_path / "straight"), weights_of(tmp_path / "cut")
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


class _Clock:
    """time.perf_counter for the trainer (two calls a step): every step takes 0.5 s, or `after` seconds
    from step `faster_from` on."""

    def __init__(self, faster_from: int | None = None, after: float = 0.25) -> None:
        self.now, self.calls, self.faster_from, self.after = 0.0, 0, faster_from, after

    def perf_counter(self) -> float:
        self.calls += 1
        fast = self.faster_from is not None and self.calls > 2 * self.faster_from
        self.now += self.after if fast else 0.5
        return self.now


def test_cosine_over_max_time_is_sized_by_the_warmup_rate_and_resumes(tmp_path, monkeypatch):
    import json

    from tformer.training import trainer as trainer_module

    kw = {"schedule": "cosine", "max_time": 50.0, "warmup_steps": 5}
    monkeypatch.setattr(trainer_module, "time", _Clock())
    run_job(str(tmp_path / "straight"), None, **kw)
    # 0.5 s per step: 50 steps (the earliest sizing) in 25 s of a 50 s budget -> the decay ends at step 100,
    # where the time runs out
    records = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert train[-1]["step"] == 99 and records[-1]["step"] == 100

    def want(k: int) -> float:  # the rate of step k + 1, as logged after step k
        s = k + 1
        if s < 5:
            return 1e-3 * s / 5
        if k < 50:  # not sized yet: the peak
            return 1e-3
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 50) / 50))

    assert [r["lr"] for r in train] == pytest.approx([want(r["step"]) for r in train], rel=1e-12, abs=1e-15)
    # interrupted after the sizing, resumed: the same decay (the schedule's state keeps it), the same weights
    monkeypatch.setattr(trainer_module, "time", _Clock())
    with pytest.raises(KeyboardInterrupt):
        run_job(str(tmp_path / "cut"), None, interrupt_at=70, **kw)
    state = load_trainer_state(tmp_path / "cut" / "checkpoint")
    assert state["scheduler"]["lr_lambdas"][0]["total"] == 100
    clock = _Clock()
    clock.now = 2 * 0.5 * 70  # the trainer's own time is its saved train_time; the clock only ticks on
    monkeypatch.setattr(trainer_module, "time", clock)
    run_job(str(tmp_path / "cut"), None, resume=True, **kw)
    a, b = weights_of(tmp_path / "straight"), weights_of(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cosine_over_max_time_follows_a_machine_that_speeds_up(tmp_path, monkeypatch):
    import json

    from tformer.training import trainer as trainer_module

    # 0.5 s per step, then 0.25 s from step 60: sized at step 50 for 100 steps, the run takes 140; measured
    # again at half, three quarters and nine tenths of the decay, the rate ends near its floor where the
    # time runs out instead of sitting at it for the last 40 steps
    monkeypatch.setattr(trainer_module, "time", _Clock(faster_from=60))
    run_job(str(tmp_path / "run"), None, schedule="cosine", max_time=50.0, warmup_steps=5, log_every=1)
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["type"] == "train"}
    assert max(lrs) == 140
    decay = [lrs[k] for k in range(50, 141)]
    assert all(b <= a for a, b in zip(decay, decay[1:], strict=False))  # down all the way, never back up
    assert max(a - b for a, b in zip(decay, decay[1:], strict=False)) < 0.05 * 1e-3  # and no jump
    # the floor (0) is reached at the last step only; sized once (for 100 steps) it would be 0 from step 100
    assert lrs[120] > 0.02 * 1e-3 and all(lrs[k] > 0 for k in range(50, 139)) and lrs[139] < 1e-12


def test_cosine_needs_a_length_or_a_budget():
    from tformer.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="needs max_steps .* or max_time"):
        TrainConfig(schedule="cosine")
    assert TrainConfig(schedule="cosine", max_time=60.0).max_steps is None


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
