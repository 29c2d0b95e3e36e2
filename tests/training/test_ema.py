"""train.ema (issue 17, item 2): the moving average equals one computed by hand from the parameters after
each step, skipped non-finite steps left out; evaluation also scores it (ema_ metrics) and restores the raw
weights exactly; ema.safetensors beside the weights; resume equals an uninterrupted run; FSDP refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from support.models import build
from tformer.config import ConfigError
from tformer.training import distributed, run_dir
from tformer.training.ema import EMA
from tformer.training.schedules import inverse_sqrt
from tformer.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

DECAY = 0.8


def _recorded(tmp_path, nan_at=(), **train_kw):
    """An LM run that records its parameters after every optimiser call, and whether that call's loss was
    made NaN (its step skipped)."""
    task, model = build("lm", precision="fp32", ema=DECAY, save_every_steps=None, **train_kw)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    calls: list[bool] = []
    real_loss = task.loss

    def loss(m, batch):
        value = real_loss(m, batch)
        calls.append(len(calls) in nan_at)
        return value._replace(total=value.total * float("nan")) if calls[-1] else value

    task.loss = loss
    trainer = Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False)
    trajectory: list[tuple[bool, dict[str, torch.Tensor]]] = []
    trainer.optimizer.register_step_post_hook(
        lambda *_: trajectory.append(
            (calls[-1], {n: p.detach().double().clone() for n, p in model.named_parameters()})
        )
    )
    trainer.fit()
    return trainer, start, trajectory


def _by_hand(start, trajectory, *, skip_skipped=True):
    ema = dict(start)
    for skipped, params in trajectory:
        if skipped and skip_skipped:
            continue
        ema = {n: DECAY * ema[n] + (1 - DECAY) * params[n] for n in ema}
    return ema


def test_the_average_is_the_hand_computed_one_of_the_parameter_trajectory(tmp_path):
    trainer, start, trajectory = _recorded(tmp_path, max_steps=6)
    assert len(trajectory) == 6 and trainer.ema is not None
    want = _by_hand(start, trajectory)
    for name, value in trainer.ema.shadow.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), want[name], rtol=0, atol=1e-6)
    last = trajectory[-1][1]
    assert any(not torch.allclose(want[n], last[n]) for n in want)  # an average, not the last weights


def test_a_skipped_step_does_not_update_the_average(tmp_path):
    trainer, start, trajectory = _recorded(tmp_path, nan_at=(2,), max_steps=5)
    assert trainer.state.nonfinite_skips == 1 and trainer.state.step == 5
    assert len(trajectory) == 6 and [s for s, _ in trajectory] == [False, False, True, False, False, False]
    assert all(torch.equal(v, trajectory[1][1][k]) for k, v in trajectory[2][1].items())  # not updated
    want, wrong = _by_hand(start, trajectory), _by_hand(start, trajectory, skip_skipped=False)
    for name, value in trainer.ema.shadow.items():
        torch.testing.assert_close(value.double(), want[name], rtol=0, atol=1e-6)
    assert any(not torch.allclose(trainer.ema.shadow[n].double(), wrong[n], atol=1e-6) for n in want)


def test_a_float16_overflow_skip_moves_neither_the_average_nor_the_schedule(tmp_path, monkeypatch):
    """float16 is for CUDA (check_precision), but torch's float16 autocast and GradScaler also run on the
    CPU, with the same bookkeeping: allowed here, one gradient made infinite at the third step (its loss
    finite), which the scaler skips and the trainer must not count as a step."""
    from tformer.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "check_precision", lambda config, world: None)
    task, model = build(
        "lm",
        precision="fp16",
        ema=DECAY,
        save_every_steps=None,
        max_steps=5,
        schedule="inverse_sqrt",
        warmup_steps=3,
    )
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    calls = []
    real_loss = task.loss

    def loss(m, batch):
        calls.append(len(calls))
        return real_loss(m, batch)

    task.loss = loss
    weight = next(p for p in model.parameters() if p.dim() == 2)
    weight.register_hook(lambda g: g * float("inf") if calls[-1] == 2 else g)
    trainer = Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False)
    trajectory: list[tuple[bool, dict[str, torch.Tensor]]] = []
    lrs: list[float] = []
    trainer.optimizer.register_step_post_hook(
        lambda *_: (
            trajectory.append(
                (calls[-1] == 2, {n: p.detach().double().clone() for n, p in model.named_parameters()})
            ),
            lrs.append(trainer.optimizer.param_groups[0]["lr"]),
        )
    )
    trainer.fit()
    s = trainer.state
    assert len(calls) == 6 and s.step == 5 and s.overflow_skips == 1 and s.nonfinite_skips == 0
    # the fused optimiser is called with the scaler's found_inf and leaves everything as it was
    assert len(trajectory) == 6 and all(
        torch.equal(v, trajectory[1][1][k]) for k, v in trajectory[2][1].items()
    )
    # the schedule did not advance over the skipped step: step 3's rate again, then steps 4 and 5
    f = inverse_sqrt(3)
    assert lrs == pytest.approx([1e-3 * f(k) for k in (0, 1, 2, 2, 3, 4)], rel=1e-12)
    want = _by_hand(start, trajectory)
    for name, value in trainer.ema.shadow.items():
        torch.testing.assert_close(value.double(), want[name], rtol=0, atol=1e-6)
    assert trainer.scaler.get_scale() < 2.0**16  # the overflow lowered the scale


def test_evaluation_scores_the_average_and_restores_the_raw_weights_exactly(tmp_path):
    task, model = build("lm", precision="fp32", ema=DECAY, max_steps=4, save_every_steps=None)
    trainer = Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False)
    history = trainer.fit()
    evals = [r for r in history if r["type"] == "eval"]
    assert evals and {"valid_nll", "valid_ppl", "ema_valid_nll", "ema_valid_ppl"} <= set(evals[-1])
    assert evals[-1]["ema_valid_nll"] != evals[-1]["valid_nll"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = trainer.evaluate()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit
    assert record["valid_nll"] == evals[-1]["valid_nll"]
    # the ema_ metrics are those of the saved average, loaded into the model
    ckpt = run_dir.latest(tmp_path)
    raw, ema = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    assert set(raw) == set(ema) and all(raw[k].shape == ema[k].shape for k in raw)
    assert all(torch.equal(ema[k], trainer.ema.state_dict(model)[k]) for k in ema)
    model.load_state_dict(ema, strict=False)
    assert task.evaluate(model.eval())["valid_nll"] == pytest.approx(record["ema_valid_nll"], abs=1e-6)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["ema"] == {"decay": DECAY, "weights": "ema.safetensors"}


def test_translation_records_ema_bleu(tmp_path):
    task, model = build("translation", precision="fp32", ema=0.5, max_steps=2, batch_tokens=64)
    history = Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False).fit()
    assert {"bleu", "chrf", "ema_bleu", "ema_chrf", "ema_valid_nll"} <= set(history[-1])


def _metrics(history):
    return [
        {k: v for k, v in r.items() if k not in ("time", "eval_seconds", "tokens_per_s", "peak_rss_bytes")}
        for r in history
    ]


def test_resume_with_ema_equals_an_uninterrupted_run(tmp_path):
    kw = dict(precision="fp32", ema=DECAY, eval_every_epochs=2, save_every_steps=None)
    task, model = build("lm", max_steps=8, **kw)
    straight = Trainer(model, task, task.train_config, out_dir=tmp_path / "straight", progress=False).fit()
    task, model = build("lm", max_steps=4, **kw)
    Trainer(model, task, task.train_config, out_dir=tmp_path / "halves", progress=False).fit()
    task, model = build("lm", max_steps=8, **kw)
    again = Trainer(model, task, task.train_config, out_dir=tmp_path / "halves", progress=False)
    assert again.resume()
    halves = again.fit()
    assert _metrics(straight) == _metrics(halves)
    assert any("ema_valid_nll" in r for r in halves)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(run_dir.latest(tmp_path / d) / name)) for d in ("straight", "halves"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_ema_with_fsdp_is_refused_at_startup(tmp_path, monkeypatch):
    task, model = build("lm", ema=0.99, max_steps=2)
    monkeypatch.setattr(distributed, "is_sharded", lambda m: True)
    with pytest.raises(ConfigError, match="train.ema = 0.99 with train.parallel = 'fsdp'"):
        Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False)


def test_buffers_come_from_the_raw_model_and_tied_weights_stay_one_tensor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied: one parameter under two names
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model(torch.randn(8, 4))  # batch-norm statistics move; the parameters do not
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    state = ema.state_dict(model)
    assert set(state) == set(model.state_dict())
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(state[key], model.state_dict()[key]), key
    assert state["0.weight"] is state["2.weight"]
    torch.testing.assert_close(state["0.weight"], model[0].weight.detach() - 0.5)
