"""train.compile = "auto" (training/compiling.py, accel/training.py): compiled only where the model's own
compiled step measured faster, in runs long enough; decided after the second step, recorded, kept on resume.

Timings come from fake clocks, and "compiling" is replaced by a stand-in that records the call and runs
the model's own forward (a real torch.compile of even a tiny model takes tens of seconds on 2 cores; the
real compiled step is covered by test_precision.py's slow test)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from support.models import build
from tformer import accel
from tformer.accel import training as rule
from tformer.accel.tune import Tuner
from tformer.config import ConfigError, TrainConfig
from tformer.training import compiling
from tformer.training import trainer as trainer_module
from tformer.training.checkpoint import load_trainer_state
from tformer.training.trainer import Trainer


@dataclass
class _Batch:
    ids: torch.Tensor
    labels: torch.Tensor


def test_batch_shapes_are_one_string_where_every_batch_has_them_and_none_where_they_vary():
    same = [_Batch(torch.zeros(4, 7, dtype=torch.long), torch.zeros(4)) for _ in range(3)]
    shapes = compiling.batch_shapes(same)
    assert shapes is not None and json.loads(shapes) == [[[4, 7], "torch.int64"], [[4], "torch.float32"]]
    other = _Batch(torch.zeros(4, 8, dtype=torch.long), torch.zeros(4))
    assert compiling.batch_shapes(same + [other]) == shapes  # an epoch's last batch may be smaller
    assert compiling.batch_shapes([*same[:1], other, *same[1:]]) is None
    assert compiling.batch_shapes([{"x": torch.zeros(2)}, {"x": torch.zeros(2)}]) is not None
    assert compiling.batch_shapes([(torch.zeros(2),), (torch.zeros(3),), (torch.zeros(2),)]) is None
    assert compiling.batch_shapes([]) is None


class _FakeClock:
    """A clock that a trial step moves by its "duration": `compiled_s` when the module runs compiled."""

    def __init__(self, eager_s: float, compiled_s: float) -> None:
        self.now, self.eager_s, self.compiled_s = 0.0, eager_s, compiled_s

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_compile(monkeypatch):
    """compile_steps stand-in: the module's "compiled call" is its own forward; the calls are recorded."""
    compiled: list[torch.nn.Module] = []

    def compile_steps(module: torch.nn.Module) -> None:
        if module not in compiling._compiled_calls:
            compiled.append(module)
            compiling._compiled_calls[module] = module._call_impl
        compiling.set_compiled(module, True)

    monkeypatch.setattr(compiling, "compile_steps", compile_steps)
    return compiled


def _timed_trials(monkeypatch, clock: _FakeClock) -> list[bool]:
    """Each trial step moves `clock` by its duration; -> which kind of step ran, in order."""
    real, kinds = compiling.trial_step, []

    def trial_step(module, loss, precision):
        on = compiling.is_compiled(module)
        kinds.append(on)
        clock.now += clock.compiled_s if on else clock.eager_s
        real(module, loss, precision)

    monkeypatch.setattr(compiling, "trial_step", trial_step)
    return kinds


def _decide(task, model, tuner, *, remaining_s, distributed=False):
    batches = task.train_batches(0)
    return compiling.decide(
        model,
        lambda: task.loss(model, batches[0]).total,
        precision="fp32",
        device=torch.device("cpu"),
        distributed=distributed,
        batches=batches,
        step_s=1.0,
        remaining_s=remaining_s,
        tuner=tuner,
    )


@pytest.mark.parametrize(("compiled_s", "expected"), [(0.5, True), (0.97, False)])
def test_a_long_run_compiles_where_the_compiled_step_measured_faster(
    tmp_path, monkeypatch, fake_compile, compiled_s, expected
):
    task, model = build("lm")
    clock = _FakeClock(eager_s=1.0, compiled_s=compiled_s)
    kinds = _timed_trials(monkeypatch, clock)
    tuner = Tuner(tmp_path / "cache.json", timer=clock)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen, why = _decide(task, model, tuner, remaining_s=rule.MIN_RUN_S)
    assert chosen is expected, why
    assert f"{1.0 / compiled_s:.2f}x" in why
    # both kinds ran (the warm-up's first compiled call compiles), the module is left eager, untouched
    assert sorted(set(kinds)) == [False, True] and len(kinds) >= 2 * (rule.WARMUP + rule.MIN_REPEATS)
    assert fake_compile == [model] and not compiling.is_compiled(model)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # cached per machine: another process's tuner answers without timing
    kinds.clear()
    again = _decide(task, model, Tuner(tmp_path / "cache.json", timer=clock), remaining_s=1e9)
    assert again[0] is expected and kinds == []


def test_a_short_run_varying_shapes_or_accel_off_time_nothing(tmp_path, monkeypatch, fake_compile):
    task, model = build("lm")
    clock = _FakeClock(eager_s=1.0, compiled_s=0.1)
    kinds = _timed_trials(monkeypatch, clock)
    tuner = Tuner(tmp_path / "cache.json", timer=clock)
    chosen, why = _decide(task, model, tuner, remaining_s=rule.MIN_RUN_S - 1)
    assert not chosen and "short run" in why
    text_task, text_model = build("translation", batch_tokens=100)  # length-bucketed batches
    chosen, why = _decide(text_task, text_model, tuner, remaining_s=1e9)
    assert not chosen and "shapes vary" in why
    monkeypatch.setenv("TFORMER_ACCEL", "off")
    chosen, why = _decide(task, model, tuner, remaining_s=1e9)
    assert not chosen and "TFORMER_ACCEL=off" in why
    assert kinds == [] and fake_compile == [] and tuner.spent_s == 0


def test_under_torchrun_only_a_cached_verdict_is_taken(tmp_path, monkeypatch, fake_compile):
    task, model = build("lm")
    clock = _FakeClock(eager_s=1.0, compiled_s=0.5)
    kinds = _timed_trials(monkeypatch, clock)
    tuner = Tuner(tmp_path / "cache.json", timer=clock)
    chosen, why = _decide(task, model, tuner, remaining_s=1e9, distributed=True)
    assert not chosen and "not measured" in why and kinds == []
    assert _decide(task, model, tuner, remaining_s=1e9)[0]  # measured in one process
    kinds.clear()
    assert _decide(task, model, tuner, remaining_s=1e9, distributed=True)[0] and kinds == []


class _StepClock:
    """time.perf_counter for the trainer: every training step takes `step_s` seconds."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s, self.calls = 0.0, step_s, 0

    def perf_counter(self) -> float:
        self.calls += 1
        self.now += self.step_s / 2
        return self.now


def _long_run(tmp_path, monkeypatch, *, steps: int, resume: bool = False, **kw) -> Trainer:
    task, model = build("lm", max_steps=steps, save_every_steps=3, precision="fp32", **kw)
    monkeypatch.setattr(trainer_module, "time", _StepClock(step_s=1000.0))  # a run of hours, seen so
    trainer = Trainer(model, task, task.train_config, out_dir=tmp_path / "run", progress=False)
    if resume:
        trainer.resume()
    trainer.fit()
    return trainer


def test_the_trainer_decides_after_the_second_step_records_it_and_a_resume_keeps_it(
    tmp_path, monkeypatch, fake_compile
):
    clock = _FakeClock(eager_s=1.0, compiled_s=0.5)
    kinds = _timed_trials(monkeypatch, clock)
    monkeypatch.setattr(accel, "_tuner", Tuner(tmp_path / "cache.json", timer=clock))
    trainer = _long_run(tmp_path, monkeypatch, steps=4)
    assert trainer.config.compile is True and fake_compile == [trainer.module]
    assert kinds  # timed once
    run = tmp_path / "run"
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert config["train"]["compile"] is True
    assert load_trainer_state(run / "checkpoint")["compile"] is True
    # a resume with the same "auto" config compiles at once, times nothing, and goes on
    kinds.clear()
    fake_compile.clear()
    resumed = _long_run(tmp_path, monkeypatch, steps=6, resume=True)
    assert resumed.config.compile is True and fake_compile == [resumed.module] and kinds == []
    assert resumed.state.step == 6


def test_evaluation_runs_the_model_uncompiled(tmp_path, monkeypatch):
    task, model = build("lm", max_steps=2, compile=False)
    trainer = Trainer(model, task, task.train_config, out_dir=tmp_path / "run", progress=False)
    seen: list[bool] = []

    def compiled_call(*args, **kwargs):
        seen.append(model.training)
        return model._call_impl(*args, **kwargs)

    model._compiled_call_impl = compiled_call  # as Module.compile() leaves it
    trainer.fit()
    assert seen and all(seen)  # the training steps' forwards only, never one in eval mode
    assert model._compiled_call_impl is compiled_call


def test_train_compile_takes_true_false_or_auto():
    assert TrainConfig().compile == "auto"
    assert TrainConfig(compile=True).compile is True and TrainConfig(compile=False).compile is False
    with pytest.raises(ConfigError, match=r"compile = 'yes': expected true, false or 'auto'"):
        TrainConfig(compile="yes")
    with pytest.raises(ConfigError, match=r"compile = 1 \(int\)"):
        TrainConfig(compile=1)


def test_a_compiled_step_that_fails_here_leaves_the_run_eager(tmp_path, monkeypatch):
    """No C++ compiler, an operation inductor cannot lower: the compiled trial raises, the verdict is
    eager (cached as such), and the module runs its own forward again."""
    task, model = build("lm")

    def compile_steps(module: torch.nn.Module) -> None:
        def broken(*args, **kwargs):
            raise RuntimeError("inductor: no working C++ compiler")

        compiling._compiled_calls[module] = broken
        compiling.set_compiled(module, True)

    monkeypatch.setattr(compiling, "compile_steps", compile_steps)
    clock = _FakeClock(eager_s=1.0, compiled_s=0.5)
    _timed_trials(monkeypatch, clock)
    tuner = Tuner(tmp_path / "cache.json", timer=clock)
    chosen, why = _decide(task, model, tuner, remaining_s=1e9)
    assert not chosen and "failed" in why
    assert not compiling.is_compiled(model)
    batch = task.train_batches(0)[0]
    assert torch.isfinite(task.loss(model, batch).total)  # the model's own forward runs
    assert _decide(task, model, Tuner(tmp_path / "cache.json", timer=clock), remaining_s=1e9)[0] is False
