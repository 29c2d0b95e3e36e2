"""Keep the best model and stop early (issue 17, item 1): train.keep_best marks the best evaluation's
checkpoint `best` (never pruned; best.json says why), in the direction of its metric; train.patience
stops after N evaluations without a new best; both resume exactly; predictors load the best and say so."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from support.models import build
from tformer.config import ConfigError, TrainConfig
from tformer.tasks import open_predictor
from tformer.training import run_dir
from tformer.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _scripted(tmp_path, metric, values, **train_kw):
    """A translation run whose evaluations (every 2 steps, inside its 14-batch epochs: each new best is
    saved at once) return `values` in turn as `metric`."""
    task, model = build(
        "translation",
        batch_tokens=64,
        eval_every_steps=2,
        keep_best=metric,
        save_every_steps=None,
        **train_kw,
    )
    it = iter(values)
    task.evaluate = lambda model: {metric: next(it)}
    history = Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False).fit()
    return [r for r in history if r["type"] == "eval"]


@pytest.mark.parametrize(
    ("metric", "values", "best_index"),
    [
        ("bleu", [10.0, 30.0, 20.0, 25.0, 5.0], 1),  # higher is better
        ("valid_nll", [3.0, 2.0, 2.5, 1.5, 1.6], 3),  # lower is better
    ],
)
def test_keep_best_marks_the_best_evaluations_checkpoint(tmp_path, metric, values, best_index):
    evals = _scripted(tmp_path, metric, values, max_steps=10, keep_checkpoints=1)
    assert [r[metric] for r in evals] == values
    step = evals[best_index]["step"]
    info = json.loads((tmp_path / "best.json").read_text())
    assert info == {
        "metric": metric,
        "value": values[best_index],
        "step": step,
        "checkpoint": f"checkpoint-{step}",
    }
    assert run_dir.best(tmp_path).name == f"checkpoint-{step}"
    assert run_dir.latest(tmp_path).name == "checkpoint-10"  # retention keeps 1 and the best
    assert {p.name for p in run_dir.checkpoints(tmp_path)} == {f"checkpoint-{step}", "checkpoint-10"}
    best_weights = load_file(str(run_dir.best(tmp_path) / "model.safetensors"))
    last_weights = load_file(str(run_dir.latest(tmp_path) / "model.safetensors"))
    assert any(not torch.equal(best_weights[k], last_weights[k]) for k in best_weights)  # another step's


def test_patience_stops_after_n_evaluations_without_a_new_best(tmp_path, capsys):
    evals = _scripted(tmp_path, "bleu", [10.0, 12.0, 11.0, 12.0, 9.0, 50.0], max_steps=100, patience=3)
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10]  # stopped at the third without one; 50 never seen
    err = capsys.readouterr().err
    assert "stopping: bleu has not improved for 3 evaluations (train.patience = 3)" in err
    assert "the best, 12 at step 4" in err and json.loads((tmp_path / "best.json").read_text())["step"] == 4


def test_best_and_patience_resume_exactly(tmp_path):
    """Half the run, then a resume to the end: the same best checkpoint, counters and final weights as
    one uninterrupted run (validation NLL, real)."""
    # the LM's epochs are one batch: an evaluation (and a save) every 2 epochs
    kw = dict(eval_every_epochs=2, keep_best="valid_nll", patience=50, save_every_steps=None)
    task, model = build("lm", max_steps=12, **kw)
    Trainer(model, task, task.train_config, out_dir=tmp_path / "straight", progress=False).fit()
    task, model = build("lm", max_steps=6, **kw)
    Trainer(model, task, task.train_config, out_dir=tmp_path / "halves", progress=False).fit()
    task, model = build("lm", max_steps=12, **kw)
    again = Trainer(model, task, task.train_config, out_dir=tmp_path / "halves", progress=False)
    assert again.resume() and again.state.best_step is not None
    again.fit()
    a, b = (json.loads((tmp_path / d / "best.json").read_text()) for d in ("straight", "halves"))
    assert a == b
    sa, sb = (
        json.loads((run_dir.latest(tmp_path / d) / "trainer_state.json").read_text())["trainer"]
        for d in ("straight", "halves")
    )
    for key in ("best_value", "best_step", "evals_since_best", "step"):
        assert sa[key] == sb[key], key
    wa, wb = (
        load_file(str(run_dir.latest(tmp_path / d) / "model.safetensors")) for d in ("straight", "halves")
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_predictor_loads_the_best_and_says_which(tmp_path, capsys):
    _scripted(tmp_path / "kept", "valid_nll", [3.0, 1.0, 2.0], max_steps=6)
    capsys.readouterr()
    open_predictor(tmp_path / "kept")
    assert (
        f"{tmp_path / 'kept'}: the best checkpoint (valid_nll 1 at step 4), checkpoint-4"
        in capsys.readouterr().err
    )
    task, model = build("lm", max_steps=2)
    Trainer(model, task, task.train_config, out_dir=tmp_path / "plain", progress=False).fit()
    open_predictor(tmp_path / "plain")
    assert "the latest checkpoint, checkpoint-2" in capsys.readouterr().err


def test_keep_best_settings_are_checked():
    with pytest.raises(ConfigError, match="keep_best = 'blue': expected one of bleu, chrf"):
        TrainConfig(keep_best="blue")
    with pytest.raises(ConfigError, match="patience = 3 needs train.keep_best"):
        TrainConfig(patience=3)
    with pytest.raises(ConfigError, match="patience must be"):
        TrainConfig(keep_best="bleu", patience=0)


def test_a_metric_the_family_does_not_record_is_one_error(tmp_path):
    task, model = build("lm", max_steps=2, keep_best="bleu")
    with pytest.raises(
        ConfigError, match="keep_best = 'bleu', but this family's evaluation records valid_nll, valid_ppl"
    ):
        Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False).fit()


def test_keep_best_on_the_moving_average_keeps_its_weights(tmp_path, capsys):
    """keep_best = "ema_valid_nll": `best` is the best evaluation's moving average as a checkpoint of its
    own (best-ema-<step>, what `tformer average CKPT --ema` writes), one at a time; predictors load it."""
    task, model = build(
        "translation",
        batch_tokens=64,  # 14-batch epochs: the evaluations every 2 steps fall inside them
        max_steps=12,
        eval_every_steps=2,
        ema=0.5,
        keep_best="ema_valid_nll",
        keep_checkpoints=20,
        save_every_steps=1,
        lr=3e-3,
    )
    history = Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False).fit()
    evals = [r for r in history if r["type"] == "eval"]
    scores = [r["ema_valid_nll"] for r in evals]
    step = evals[scores.index(min(scores))]["step"]
    assert len(set(scores)) > 1 and [r["ema_valid_nll"] for r in evals] != [r["valid_nll"] for r in evals]
    best = run_dir.best(tmp_path)
    assert best is not None and best.name == f"best-ema-{step}"
    assert sorted(p.name for p in tmp_path.glob("best-ema-*")) == [best.name]  # older bests are gone
    info = json.loads((tmp_path / "best.json").read_text())
    assert info == {"metric": "ema_valid_nll", "value": min(scores), "step": step, "checkpoint": best.name}
    ema = load_file(str(tmp_path / f"checkpoint-{step}" / "ema.safetensors"))
    raw = load_file(str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    kept = load_file(str(best / "model.safetensors"))
    assert kept.keys() == raw.keys() and all(torch.equal(kept[k], ema[k]) for k in kept)
    assert any(not torch.equal(kept[k], raw[k]) for k in kept)
    capsys.readouterr()
    predictor = open_predictor(tmp_path)
    assert f"the best checkpoint (ema_valid_nll {min(scores):.4g} at step {step}), {best.name}" in (
        capsys.readouterr().err
    )
    got = predictor.model.state_dict()
    assert all(torch.equal(got[k], kept[k]) for k in kept)  # the moving average is what predicts


def test_keep_best_on_the_moving_average_needs_one():
    with pytest.raises(
        ConfigError, match="keep_best = 'ema_bleu' scores the moving average .* needs train.ema"
    ):
        TrainConfig(keep_best="ema_bleu")
    with pytest.raises(ConfigError, match="keep_best = 'ema_blue': expected one of"):
        TrainConfig(keep_best="ema_blue", ema=0.9)
    assert TrainConfig(keep_best="ema_bleu", ema=0.9).keep_best == "ema_bleu"
