"""Logging people already use (issue 17, item 3): TensorBoard event files (read back with tensorboard's own
reader), the attention heatmap at each evaluation, `tformer plot`, and plain progress lines where stderr
is not a terminal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from support.models import build
from tformer.cli import main
from tformer.config import ConfigError, TrainConfig
from tformer.training.logsinks import LineProgress, training_bar
from tformer.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator


def _events(directory):
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _train(tmp_path, family, **train_kw):
    task, model = build(family, log=("jsonl", "tensorboard"), **train_kw)
    Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False).fit()
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["translation", "classification", "lm"])
def test_tensorboard_holds_every_record_and_the_attention_picture(tmp_path, family):
    records = _train(tmp_path, family, max_steps=6, eval_every_steps=3)
    acc = _events(tmp_path / "tensorboard")
    tags = acc.Tags()
    train = [r for r in records if r["type"] == "train"]
    for field, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert got == [(r["step"], pytest.approx(r[field], rel=1e-6)) for r in train], tag
    assert "train/tokens_per_s" in tags["scalars"]
    assert all(r["grad_norm"] > 0 for r in train)
    evals = [r for r in records if r["type"] == "eval"]
    metrics = {k for r in evals for k in r} - {"type", "step", "epoch"}
    assert {f"eval/{m}" for m in metrics} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("eval/valid_nll")] == [r["step"] for r in evals]
    images = acc.Images("attention")
    assert [i.step for i in images] == [r["step"] for r in evals]
    assert images[0].width > 100 and images[0].height > 100


def test_without_tensorboard_in_train_log_no_event_files(tmp_path):
    task, model = build("lm", max_steps=2)
    Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False).fit()
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "log.jsonl").exists()


def test_a_resumed_run_purges_the_events_after_its_checkpoint(tmp_path):
    """Steps logged after the last checkpoint are logged again on resume: TensorBoard keeps one value per
    step, as log.jsonl does."""
    _train(tmp_path, "lm", max_steps=8, log_every=1, save_every_steps=4)
    # as if the run had died after logging steps 5-8 but before their checkpoint: back to step 4's
    import shutil

    from tformer.training import run_dir

    latest = run_dir.latest(tmp_path)
    assert latest is not None and latest.name == "checkpoint-8"
    shutil.rmtree(latest)
    task, model = build("lm", max_steps=8, log_every=1, save_every_steps=4, log=("jsonl", "tensorboard"))
    trainer = Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False)
    assert trainer.resume() and trainer.state.step == 4
    trainer.fit()
    steps = [e.step for e in _events(tmp_path / "tensorboard").Scalars("train/loss")]
    assert steps == list(range(1, 9))


def test_train_log_values_are_checked():
    assert TrainConfig(log=["jsonl", "tensorboard"]).log == ("jsonl", "tensorboard")
    with pytest.raises(ConfigError, match="unknown 'wandb'"):
        TrainConfig(log=("jsonl", "wandb"))
    with pytest.raises(ConfigError, match="'jsonl' \\(always"):
        TrainConfig(log=("tensorboard",))


def test_plot_draws_the_curves_of_a_run(tmp_path, capsys):
    _train(tmp_path / "run", "translation", max_steps=6, eval_every_steps=3)
    with (tmp_path / "run" / "log.jsonl").open("a") as fh:
        fh.write('{"type": "train", "st')  # a line a crash cut short
    assert main(["plot", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "curves.png" in out and "1 incomplete or unreadable line(s) left out" in err
    with Image.open(tmp_path / "run" / "curves.png") as im:
        assert im.size[0] > 800 and len(np.unique(np.asarray(im.convert("L")))) > 20
    assert main(["plot", str(tmp_path)]) != 0
    assert "no log.jsonl here" in capsys.readouterr().err


def test_progress_lines_where_stderr_is_not_a_terminal():
    now = [0.0]
    lines: list[str] = []
    bar = LineProgress(100, desc="epoch 1/2", every=10.0, clock=lambda: now[0], write=lines.append)
    for _ in range(30):
        now[0] += 1.0
        bar.update()
        bar.set_postfix(loss="1.234", tok_s="5,000")
    assert lines == ["epoch 1/2: step 10/100, loss 1.234, tok_s 5,000"] + [
        f"epoch 1/2: step {n}/100, loss 1.234, tok_s 5,000" for n in (20, 30)
    ]
    now[0] += 3.0
    bar.update(5)
    bar.close()  # the end is shown once
    assert lines[-1].startswith("epoch 1/2: step 35/100") and not any("\r" in line for line in lines)
    quiet: list[str] = []
    short = LineProgress(5, desc="e", clock=lambda: 0.0, write=quiet.append)
    short.update(5)
    short.close()
    assert quiet == []  # a run shorter than one interval prints nothing


def test_training_bar_is_lines_off_a_terminal(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(training_bar(total=3, initial=0, desc="e", enabled=True), LineProgress)
    off = training_bar(total=3, initial=0, desc="e", enabled=False)
    assert not isinstance(off, LineProgress) and off.disable
