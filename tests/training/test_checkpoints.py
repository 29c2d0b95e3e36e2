"""Trust the run (issue 13): checkpoints that run no code, survive a crash at any point of a save, never
hold non-finite numbers; the run directory belongs to the run that wrote it; signals stop cleanly."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from support.jobs import TESTS, run_job, weights_of
from tformer.training import run_dir
from tformer.training.checkpoint import (
    STATE,
    CheckpointError,
    load_trainer_state,
    read_config,
    write_state,
)
from tformer.training.trainer import Interrupted


def assert_sameweights_of(a: Path, b: Path) -> None:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run: the reference every interrupted run must equal bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_job(str(out), 8)
    return out


# --- nothing in a checkpoint runs code ------------------------------------------------------------------
class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_crafted_pickle_in_a_checkpoint_is_never_loaded(tmp_path):
    out = tmp_path / "run"
    run_job(str(out), 2)
    ckpt = (out / "checkpoint").resolve()
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (ckpt / name).unlink()
    torch.save({"optimizer": _Payload(str(tmp_path / "pwned"))}, ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"trainer_state.pt: a trainer state from tformer 0.1.*pickle"):
        run_job(str(out), 4, resume=True)
    assert not (tmp_path / "pwned").exists()


def test_a_tformer_01_run_directory_is_refused_for_resuming_but_still_predicts(tmp_path):
    out = tmp_path / "run"
    run_job(str(out), 2)
    old = tmp_path / "old"
    old.mkdir()
    (old / "checkpoint").mkdir()
    for f in (out / "checkpoint").iterdir():
        if not f.name.startswith("trainer_state"):
            (old / "checkpoint" / f.name).write_bytes(f.read_bytes())
    torch.save({"trainer": {"step": 2}}, old / "checkpoint" / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="tformer 0.1.*predict, eval, viz and export still work"):
        run_job(str(old), 4, resume=True)
    from tformer.tasks import Translator

    assert Translator.load(old / "checkpoint").translate(["un"], beam_size=1)  # the weights still serve


def test_trainer_state_round_trips_without_pickle(tmp_path):
    state = {
        "t": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "shared": [torch.ones(2)] * 2,
        "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 3, 0, 0.5),
        "python": (3, tuple(range(4)), None),
        "ids": {0: {"step": torch.tensor(4.0)}, 1: {}},
        "history": [{"type": "eval", "loss": float("inf"), "__odd": 1}],
    }
    write_state(tmp_path, state)
    back = load_trainer_state(tmp_path)
    assert torch.equal(back["t"], state["t"]) and torch.equal(back["shared"][1], torch.ones(2))
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    assert np.array_equal(back["numpy"][1], state["numpy"][1]) and back["numpy"][2:] == (3, 0, 0.5)
    assert back["python"] == state["python"]
    assert set(back["ids"]) == {0, 1} and torch.equal(back["ids"][0]["step"], torch.tensor(4.0))
    assert back["history"] == state["history"]
    raw = json.loads((tmp_path / STATE).read_text())
    raw["evil"] = {"__class__": "os.system"}
    (tmp_path / STATE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown entry '__class__'"):
        load_trainer_state(tmp_path)


def test_a_trainer_state_with_missing_entries_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    run_job(str(out), 2)
    path = out / "checkpoint" / STATE
    raw = json.loads(path.read_text())
    del raw["optimizer"]
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"trainer_state.json: no 'optimizer' entry"):
        run_job(str(out), 4, resume=True)
    raw = json.loads(path.read_text())
    raw["optimizer"], raw["trainer"] = {"state": {}}, {"step": 2, "wrong": 1}
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"trainer_state.json: the trainer state does not fit"):
        run_job(str(out), 4, resume=True)


def test_a_config_json_that_is_not_an_object_is_refused(tmp_path):
    out = tmp_path / "run"
    run_job(str(out), 1)
    (out / "checkpoint" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: a JSON list; expected an object"):
        read_config(out / "checkpoint")
    (out / "checkpoint" / "config.json").write_text('{"task": "translation", "train": [1]}')
    with pytest.raises(CheckpointError, match=r"'train' is a JSON list; expected an object"):
        read_config(out / "checkpoint")


# --- the layout: one atomic switch, retention, periodic saves -------------------------------------------
def test_saves_every_n_steps_and_keeps_the_newest(tmp_path):
    run_job(str(tmp_path), 7, save_every_steps=2, keep_checkpoints=2)
    assert [p.name for p in run_dir.checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-7"]
    assert os.readlink(tmp_path / "checkpoint") == "checkpoint-7"
    assert load_trainer_state(tmp_path / "checkpoint-6")["trainer"]["step"] == 6


def test_retention_never_deletes_what_the_links_name(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "config.json").write_text("{}")
    os.symlink("checkpoint-1", tmp_path / "best")
    os.symlink("checkpoint-2", tmp_path / "checkpoint")
    (tmp_path / ".checkpoint-5.tmp-abc").mkdir()  # a save that died
    (tmp_path / "notes.txt").write_text("mine")
    run_dir.prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best",
        "checkpoint",
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-4",
        "notes.txt",
    ]


@pytest.mark.parametrize("point", ["write:state", "rename:checkpoint", "link:made", "pruned"])
def test_a_kill_at_any_point_of_a_save_resumes_exactly(tmp_path, straight, point):
    out = tmp_path / "run"
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from support.jobs import run_job; "
        f"run_job({str(out)!r}, 8, save_every_steps=2)"
    )
    env = {**os.environ, "TFORMER_CRASH_AT": f"{point}@2"}  # during the second save (step 4)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    saved = run_dir.latest(out)
    assert saved is not None and saved.name in ("checkpoint-2", "checkpoint-4")
    run_job(str(out), 8, resume=True, save_every_steps=2)
    assert_sameweights_of(out, straight)


def test_resume_without_the_link_finds_the_newest_complete_checkpoint(tmp_path, straight):
    out = tmp_path / "run"
    run_job(str(out), 4, save_every_steps=2)
    (out / "checkpoint").unlink()
    run_job(str(out), 8, resume=True, save_every_steps=2)
    assert_sameweights_of(out, straight)


def test_resume_before_any_checkpoint_starts_from_scratch(tmp_path, straight):
    out = tmp_path / "run"
    trainer = run_job(str(out), 8, resume=True)
    assert trainer.state.step == 8
    assert_sameweights_of(out, straight)


def _packed(values: dict, cat):
    """A state keyed by parameter name with each cross-attention's q_proj / kv_proj joined into the one
    in_proj of tformer <= 0.2 (`cat` joins two values)."""
    out = {}
    for key, value in values.items():
        if ".cross_attn.q_proj." in key:
            kv = values[key.replace(".q_proj.", ".kv_proj.")]
            out[key.replace(".q_proj.", ".in_proj.")] = cat(value, kv)
        elif ".cross_attn.kv_proj." not in key:
            out[key] = value
    return out


def _cat(a, b):
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) and a.dim() > 0 else a


def test_a_run_saved_by_tformer_0_2_resumes_exactly(tmp_path, straight):
    """tformer <= 0.2 kept a cross-attention's projections in one in_proj: its weights and its optimiser's
    moments (keyed by parameter name) are split on loading, and the run goes on bit for bit."""
    from safetensors.torch import save_file

    out = tmp_path / "run"
    run_job(str(out), 4, save_every_steps=2)
    ckpt = (out / "checkpoint").resolve()
    weights = _packed(load_file(str(ckpt / "model.safetensors")), _cat)
    assert any(".cross_attn.in_proj.weight" in k for k in weights)
    save_file(weights, str(ckpt / "model.safetensors"))
    state = load_trainer_state(ckpt)
    opt = state["optimizer"]
    opt["state"] = _packed(opt["state"], _cat)
    for group in opt["param_groups"]:
        names = [
            n.replace(".kv_proj.", ".in_proj.").replace(".q_proj.", ".in_proj.") for n in group["params"]
        ]
        group["params"] = list(dict.fromkeys(names))
    write_state(ckpt, state)
    run_job(str(out), 8, resume=True, save_every_steps=2)
    assert_sameweights_of(out, straight)


# --- who may write into --out -----------------------------------------------------------------------------
def test_a_fresh_run_into_another_runs_directory_is_refused(tmp_path):
    run_job(str(tmp_path), 2)
    before = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(
        CheckpointError, match=r"holds a run of `train` \(checkpoint checkpoint-2\).*--resume"
    ):
        run_job(str(tmp_path), 3)
    assert (tmp_path / "log.jsonl").read_text() == before  # nothing mixed into its log
    run_job(str(tmp_path), 3, overwrite=True)
    assert [p.name for p in run_dir.checkpoints(tmp_path)] == ["checkpoint-3"]
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [3, 3]


def test_another_commands_directory_is_neither_resumed_nor_reused(tmp_path):
    run_dir.claim(tmp_path, command="demo", resume=False)
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(CheckpointError, match=r"holds a run of `demo`; choose another --out, or replace"):
        run_job(str(tmp_path), 2)
    with pytest.raises(CheckpointError, match=r"written by `demo`, not `train`; refusing to resume"):
        run_job(str(tmp_path), 2, resume=True)
    run_dir.claim(tmp_path, command="demo", resume=False, rerun=True)  # the demo reruns into its own
    assert not (tmp_path / "log.jsonl").exists()


def test_a_foreign_checkpoint_directory_is_never_deleted(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "weights.bin").write_text("someone else's")
    with pytest.raises(CheckpointError, match="tformer did not write there.*--overwrite"):
        run_job(str(tmp_path), 2)
    assert (tmp_path / "checkpoint" / "weights.bin").read_text() == "someone else's"
    with pytest.raises(CheckpointError, match="no tformer run marked as its own"):
        run_job(str(tmp_path), 2, resume=True)


def test_no_room_for_a_checkpoint_is_found_before_step_one(tmp_path, monkeypatch):
    class Usage:
        free = 1000  # bytes

    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: 0.0 MiB free, but a checkpoint .* needs about"):
        run_job(str(tmp_path), 2)
    assert not (tmp_path / "log.jsonl").exists()  # not one step was taken


def test_a_full_disk_during_a_save_names_the_path_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from tformer.training import checkpoint

    real, calls = checkpoint.save_model, []

    def save_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_model", save_model)
    with pytest.raises(
        CheckpointError, match=r"checkpoint-4: could not write the checkpoint .*No space left"
    ):
        run_job(str(tmp_path), 6, save_every_steps=2)
    assert os.readlink(tmp_path / "checkpoint") == "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tformer-run.json",
        ".tformer-run.lock",
        "checkpoint",
        "checkpoint-2",
        "log.jsonl",
    ]


def test_a_real_write_failure_during_a_save_is_a_clear_error(tmp_path):
    # a file-size limit makes the real safetensors write fail, as a full disk does (SafetensorError)
    code = (
        "import resource, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        f"sys.path.insert(0, {str(TESTS)!r}); from support.jobs import run_job; "
        "from tformer.training.checkpoint import CheckpointError\n"
        f"try:\n    run_job({str(tmp_path)!r}, 3)\nexcept CheckpointError as e:\n    print(e); sys.exit(3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-3000:]
    assert f"{tmp_path}/checkpoint-3: could not write the checkpoint" in done.stdout
    assert "File too large" in done.stdout and "MiB free there" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tformer-run.json",
        ".tformer-run.lock",
        "log.jsonl",
    ]


def test_a_log_line_cut_short_by_a_crash_is_dropped_with_a_warning(tmp_path, straight, capfd):
    out = tmp_path / "run"
    run_job(str(out), 4, save_every_steps=2)
    with (out / "log.jsonl").open("a") as fh:
        fh.write('{"type": "train", "st')
    run_job(str(out), 8, resume=True, save_every_steps=2)
    assert "1 incomplete or unreadable line(s) (line 3)" in capfd.readouterr().err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4, 6, 8]  # the first run's final eval at 4 stays
    assert_sameweights_of(out, straight)


# --- non-finite numbers never reach a checkpoint ----------------------------------------------------------
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, capfd):
    # log_every is far beyond the run: the step is caught on its own, not at a log point
    trainer = run_job(str(tmp_path), 6, nan_at=(2,), log_every=1000)
    state = load_trainer_state(tmp_path / "checkpoint")
    assert state["trainer"]["step"] == 6 and state["trainer"]["nonfinite_skips"] == 1
    assert state["scheduler"]["last_epoch"] == 6  # the skipped step did not advance the schedule ...
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {6.0}  # ... nor Adam's step count
    assert all(
        torch.isfinite(t).all() for t in load_file(str(tmp_path / "checkpoint/model.safetensors")).values()
    )
    assert trainer.state.batch_in_epoch == 7  # its batch was consumed
    assert (
        "step 3: the gradient is not finite (NaN or inf); step skipped (1 of at most"
        in capfd.readouterr().err
    )


def test_too_many_non_finite_steps_stop_with_an_error_and_save_nothing(tmp_path):
    with pytest.raises(FloatingPointError, match=r"stopped at step 3: 3 steps had a non-finite gradient"):
        run_job(str(tmp_path), 20, nan_at=tuple(range(2, 20)), max_nonfinite_skips=2, save_every_steps=1)
    saved = load_trainer_state(tmp_path / "checkpoint")
    assert saved["trainer"]["step"] == 2  # the last finite step
    for t in load_file(str(tmp_path / "checkpoint/model.safetensors")).values():
        assert torch.isfinite(t).all()


def test_a_learning_rate_of_a_million_stops_with_an_error_not_a_nan_checkpoint(tmp_path):
    # the case: train.lr=1e6 with few steps used to exit 0 with all-NaN weights on disk
    with pytest.raises(FloatingPointError, match=r"more than train.max_nonfinite_skips = 10; lower the lea"):
        run_job(str(tmp_path), 10, lr=1e6, log_every=1000)
    for t in load_file(str(tmp_path / "checkpoint/model.safetensors")).values():
        assert torch.isfinite(t).all()


def test_non_finite_parameters_are_never_saved(tmp_path):
    trainer = run_job(str(tmp_path), 2)
    with torch.no_grad():
        next(trainer.module.parameters())[0].fill_(float("nan"))
    trainer.state.step += 1  # a new state to save
    with pytest.raises(FloatingPointError, match=r"step 3: parameters are not finite .*not saving"):
        trainer.save()
    assert [p.name for p in run_dir.checkpoints(tmp_path)] == ["checkpoint-2"]


# --- signals ------------------------------------------------------------------------------------------------
def test_sigterm_saves_and_names_the_signal(tmp_path, straight, capfd):
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as stopped:
        run_job(str(out), 8, signal_at=3, sig=signal.SIGTERM)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.saved is not None
    assert "SIGTERM: checkpoint saved at step 4" in capfd.readouterr().err
    run_job(str(out), 8, resume=True)
    assert_sameweights_of(out, straight)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_second_signal_after_an_update_saves_nothing(tmp_path, straight, capfd):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(str(out), 8, abort_after_update_at=4, save_every_steps=2)
    assert "stopped at once inside step 5, not saved" in capfd.readouterr().err
    assert os.readlink(out / "checkpoint") == "checkpoint-4"  # not a state with an uncounted update
    run_job(str(out), 8, resume=True, save_every_steps=2)
    assert_sameweights_of(out, straight)


def test_the_cli_exits_143_on_sigterm_and_resumes(tmp_path):
    text = "".join(f"line {i} of a small text to model\n" for i in range(200))
    (tmp_path / "t.txt").write_text(text)
    cmd = [sys.executable, "-m", "tformer.cli", "train", "lm", "--train", str(tmp_path / "t.txt")]
    cmd += ["--valid", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), "--no-progress"]
    tiny = ["data.tokenizer=char", "model.d_model=16", "model.n_heads=2", "model.d_ff=32"]
    tiny += ["model.n_layers=1", "model.max_seq_len=16", "train.batch_size=4", "train.log_every=1"]
    proc = subprocess.Popen([*cmd, *tiny, "train.epochs=1000"], stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM: checkpoint saved at step" in err
    step = load_trainer_state(tmp_path / "run" / "checkpoint")["trainer"]["step"]
    done = subprocess.run(
        [*cmd, "--resume", f"train.max_steps={step + 2}"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"resumed at step {step}" in done.stderr
    assert load_trainer_state(tmp_path / "run" / "checkpoint")["trainer"]["step"] == step + 2


def test_the_cli_names_the_way_out_of_a_used_directory_and_resumes_from_nothing(tmp_path, capsys):
    from tformer.cli import main

    (tmp_path / "t.txt").write_text("".join(f"row {i} of text\n" for i in range(60)))
    base = ["train", "lm", "--train", str(tmp_path / "t.txt"), "--valid", str(tmp_path / "t.txt")]
    base += ["--out", str(tmp_path / "run"), "--no-progress", "data.tokenizer=char", "model.d_model=16"]
    base += ["model.n_heads=2", "model.d_ff=32", "model.n_layers=1", "model.max_seq_len=16"]
    base += ["train.batch_size=4", "train.max_steps=2"]
    assert main([*base, "--resume"]) == 0
    assert "has no checkpoint yet; starting from scratch" in capsys.readouterr().err
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "holds a run of `train` (checkpoint checkpoint-2); continue it with --resume" in err
    assert main([*base, "--overwrite", "--resume"]) == 2
    assert "give one" in capsys.readouterr().err
    assert main([*base, "--overwrite"]) == 0


def test_predictors_read_one_save_through_the_link_or_the_run_directory(tmp_path):
    from tformer.tasks import Translator, load_predictor

    run_job(str(tmp_path), 4, save_every_steps=2)
    assert run_dir.resolve(tmp_path) == run_dir.resolve(tmp_path / "checkpoint") == tmp_path / "checkpoint-4"
    a = Translator.load(tmp_path / "checkpoint").translate(["deux cent un"], beam_size=1)
    assert load_predictor(tmp_path).translate(["deux cent un"], beam_size=1) == a
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        ".tformer-run.json",
        ".tformer-run.lock",
        "checkpoint",
        "checkpoint-2",
        "checkpoint-4",
        "log.jsonl",
    ]


def test_a_second_signal_while_the_counters_change_waits_for_them(tmp_path, straight, monkeypatch):
    # the first Ctrl-C lands in step 5, the second while the previous step's flag is being read (on CUDA
    # the host waits there): the counters finish changing, the step is counted, then the run stops and
    # saves a state that resumes exactly
    from tformer.training import trainer as trainer_module

    class SignallingFlag:
        def __init__(self, flag):
            self.flag = flag

        def read(self):
            value = self.flag.read()
            os.kill(os.getpid(), signal.SIGINT)
            return value

    real_step = trainer_module.Trainer._step

    def step(self, batches):
        if self.state.step == 4 and self._pending is not None:
            os.kill(os.getpid(), signal.SIGINT)
            self._pending = SignallingFlag(self._pending)
        return real_step(self, batches)

    monkeypatch.setattr(trainer_module.Trainer, "_step", step)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(str(out), 8)
    state = load_trainer_state(out / "checkpoint")
    assert state["trainer"]["step"] == 5 and state["scheduler"]["last_epoch"] == 5
    monkeypatch.setattr(trainer_module.Trainer, "_step", real_step)
    run_job(str(out), 8, resume=True)
    assert_sameweights_of(out, straight)


def test_two_runs_cannot_train_into_one_directory_at_once(tmp_path):
    held = run_dir.lock(tmp_path)
    try:
        with pytest.raises(
            CheckpointError, match=rf"another tformer process \(pid {os.getpid()}\) is training"
        ):
            run_job(str(tmp_path), 2)
        assert not (tmp_path / "log.jsonl").exists()
    finally:
        run_dir.unlock(held)
    run_job(str(tmp_path), 2)  # free again


def test_a_tformer_01_directory_is_named_and_the_demo_replaces_its_own(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    torch.save({}, tmp_path / "checkpoint" / "trainer_state.pt")
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(CheckpointError, match=r"holds a run of tformer 0.1 .*--overwrite to replace it"):
        run_dir.claim(tmp_path, command="train", resume=False)
    run_dir.claim(tmp_path, command="demo", resume=False, rerun=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tformer-run.json"]
