"""Distributed training on CPU (gloo, 2 processes spawned here): DDP and FSDP give the parameters one process
gets from the same global batches; a checkpoint written by 2 processes resumes in 1; accumulation over k
batches equals one k times larger batch; bad settings fail with clear messages.

Tolerance: 2e-5 absolute on parameters after 4 AdamW steps at lr 1e-3 (values of order 0.1-1). The runs
differ only in float32 summation order (two ranks' gradients averaged by the collective, vs accumulated in
one process; one large matmul vs two small ones), about 1e-7 relative per gradient, so parameters agree
to ~1e-6. Adam's eps is 1e-6 here, not the paper's 1e-9: a component whose true gradient is exactly zero
(the key bias of attention, which softmax ignores) holds only round-off (~1e-10), and with eps = 1e-9
Adam would turn that noise into +-lr steps that differ between any two summation orders. A wrong
normalisation (mean of micro-batch means, a missing or doubled division by the world size or k) moves
parameters by far more than the tolerance (checked by tests below that break it on purpose).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from support.models import TEXT, build
from tformer.config import ConfigError, TrainConfig
from tformer.training import Trainer
from tformer.training.checkpoint import load_trainer_state
from tformer.training.trainer import LossValue

TOL = 2e-5
STEPS = 4
FAMILIES = ("lm", "classification", "translation")


pytestmark = pytest.mark.usefixtures("one_thread")


def batch_kw(family: str) -> dict:
    return {"lm": {"batch_size": 4}, "classification": {"batch_tokens": 24}}.get(
        family, {"batch_tokens": 120}
    )


def run(
    family: str,
    out: Path,
    *,
    steps: int = STEPS,
    resume: bool = False,
    interrupt: tuple[int, int] | None = None,
    nan: int | None = None,
    **train_kw,
) -> None:
    """Train; `interrupt = (rank, step)`: that rank alone sees a Ctrl-C during that step. `nan = g`: the
    loss of the g-th batch of the run (counting every rank's batches in the order of the epoch's list) is
    NaN: the same batch whatever the world size."""
    task, model = build(family, max_steps=steps, **batch_kw(family), **train_kw)
    trainer = Trainer(model, task, task.train_config, out_dir=out, progress=False)
    if resume:
        trainer.resume()
    if nan is not None:
        real_loss, calls = task.loss, [0]
        acc, w = trainer.config.accumulate, trainer.world

        def nan_loss(m, batch):
            k, calls[0] = calls[0], calls[0] + 1  # this rank's k-th batch
            g = (k // acc) * w.size * acc + w.rank * acc + k % acc
            value = real_loss(m, batch)
            return value._replace(total=value.total * float("nan")) if g == nan else value

        task.loss = nan_loss
    if interrupt is not None:
        real = task.loss

        def loss(m, batch):
            if (trainer.world.rank, trainer.state.step) == interrupt:
                trainer._interrupted = True  # what the SIGINT handler does
            return real(m, batch)

        task.loss = loss
        with pytest.raises(KeyboardInterrupt):  # on every rank, after the same step
            trainer.fit()
        return
    trainer.fit()


def _worker(rank: int, port: int, jobs: list[tuple[str, str, dict]]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for family, out, kw in jobs:
            run(family, Path(out), **kw)
    finally:
        dist.destroy_process_group()


def spawn(jobs: list[tuple[str, str, dict]]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, jobs), nprocs=2, join=True)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Everything the 2-process tests compare, in one spawn (process start-up dominates the time)."""
    import shutil

    root = tmp_path_factory.mktemp("dist")
    run("lm", root / "one-lm-half", steps=STEPS // 2, accumulate=2)
    shutil.copytree(root / "one-lm-half", root / "fsdp-lm-resumed", symlinks=True)
    spawn(
        [(f, str(root / f"ddp-{f}"), {}) for f in FAMILIES]
        + [("lm", str(root / "ddp-lm-half"), {"steps": STEPS // 2})]
        + [("lm", str(root / "ddp-lm-acc2"), {"accumulate": 2})]
        + [("lm", str(root / "ddp-lm-interrupted"), {"interrupt": (1, 1)})]
        + [(f, str(root / f"fsdp-{f}"), {"parallel": "fsdp"}) for f in FAMILIES]
        + [("lm", str(root / "fsdp-lm-resumed"), {"parallel": "fsdp", "resume": True})]
        + [("lm", str(root / "ddp-lm-nan"), {"nan": 3})]
        + [("lm", str(root / "fsdp-lm-nan"), {"parallel": "fsdp", "nan": 3})]
    )
    run("lm", root / "one-lm-nan", accumulate=2, nan=3)  # batch 3: rank 1's in step 2
    for f in FAMILIES:  # one process, the same global batches: 2 per step, accumulated
        run(f, root / f"one-{f}", accumulate=2)
    run("lm", root / "one-lm-acc4", accumulate=4)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_equals_one_process(runs, family):
    one, ddp = runs / f"one-{family}", runs / f"ddp-{family}"
    initial = max_diff(one, ddp)
    assert initial < TOL, initial
    # the logged loss is the global one: equal to the single process's
    log = [r for r in _records(ddp) if r["type"] == "train"]
    ref = [r for r in _records(one) if r["type"] == "train"]
    assert [r["step"] for r in log] == [r["step"] for r in ref] == [2, 4]
    for a, b in zip(log, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_equals_one_process(runs, family):
    diff = max_diff(runs / f"one-{family}", runs / f"fsdp-{family}")
    assert diff < TOL, diff
    evals = [r for r in _records(runs / f"fsdp-{family}") if r["type"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == STEPS and "valid_nll" in evals[0]


def test_resume_two_processes_in_one(runs, tmp_path):
    out = tmp_path / "resumed"
    import shutil

    shutil.copytree(runs / "ddp-lm-half", out, symlinks=True)
    state = load_trainer_state(out / "checkpoint")
    assert state["world_size"] == 2 and state["trainer"]["step"] == STEPS // 2
    run("lm", out, resume=True, accumulate=2)  # 1 process x 2 batches = the 2 x 1 of the first half
    diff = max_diff(out, runs / "one-lm")
    assert diff < TOL, diff


def test_resume_one_process_in_two_under_fsdp(runs):
    # the 1-process half's optimiser state, loaded into FSDP shards, continues as the straight run
    diff = max_diff(runs / "fsdp-lm-resumed", runs / "one-lm")
    assert diff < TOL, diff


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_non_finite_loss_on_one_rank_is_skipped_by_all(runs, parallel):
    # rank 1 alone gets a NaN loss at step 2 (0-based 1); the all-reduced gradient is NaN on every rank, so
    # all skip that step together (no rank waits for another), as one process skips it
    out = runs / f"{parallel}-lm-nan"
    state = load_trainer_state(out / "checkpoint")
    assert state["trainer"]["step"] == STEPS and state["trainer"]["nonfinite_skips"] == 1
    diff = max_diff(runs / "one-lm-nan", out)
    assert diff < TOL, diff
    assert max_diff(runs / "one-lm-nan", runs / "one-lm") > 50 * TOL  # the skip changed the run


def test_ddp_with_accumulation(runs):
    # 2 processes x accumulate 2 (no_sync on the first micro-batch) = 1 process x accumulate 4
    diff = max_diff(runs / "ddp-lm-acc2", runs / "one-lm-acc4")
    assert diff < TOL, diff


def test_ctrl_c_on_one_rank_stops_all_after_the_same_step(runs):
    # rank 1 alone is interrupted during step 2 (0-based 1); the ranks agree at the end of that step,
    # all stop there, and rank 0 saves the checkpoint of step 2 (no rank left waiting in a collective)
    state = load_trainer_state(runs / "ddp-lm-interrupted/checkpoint")
    assert state["trainer"]["step"] == 2


def test_accumulation_equals_a_larger_batch(tmp_path):
    # LM windows are drawn as one (n, batch_size) tensor per epoch: batch 8 holds batches 2i and 2i + 1
    # of batch 4, which accumulate = 2 sums into one step.
    run("lm", tmp_path / "acc", accumulate=2)
    task, model = build("lm", max_steps=STEPS, batch_size=8)
    small, _ = build("lm", max_steps=STEPS, batch_size=4)
    assert torch.equal(
        task.train_batches(0)[0].starts, torch.cat([b.starts for b in small.train_batches(0)[:2]])
    )
    Trainer(model, task, task.train_config, out_dir=tmp_path / "big", progress=False).fit()
    diff = max_diff(tmp_path / "acc", tmp_path / "big")
    assert diff < TOL, diff
    # and the test can fail: two separate steps of 4 differ by far more than the tolerance
    run("lm", tmp_path / "two-steps", steps=2 * STEPS)
    assert max_diff(tmp_path / "big", tmp_path / "two-steps") > 50 * TOL


def test_wrong_normalisation_is_caught(tmp_path):
    """Averaging each micro-batch's mean loss (instead of one division by the global count) moves the
    parameters far beyond the tolerance: the comparisons above can fail."""
    task, model = build("translation", max_steps=STEPS, batch_tokens=120)
    real = task.loss

    def mean_of_means(m, batch):  # the common mistake: normalise each micro-batch by its own count
        total, items, tokens = real(m, batch)
        return LossValue(total / items * 10, 10, tokens)

    task.loss = mean_of_means
    Trainer(
        model, task, task.train_config.replace(accumulate=2), out_dir=tmp_path / "bad", progress=False
    ).fit()
    run("translation", tmp_path / "good", accumulate=2)
    assert max_diff(tmp_path / "bad", tmp_path / "good") > 50 * TOL


def test_too_few_batches_for_a_step(tmp_path):
    task, model = build("lm", max_steps=STEPS, batch_size=4, accumulate=100)
    with pytest.raises(
        ConfigError, match=r"fewer than one step takes \(processes x train.accumulate = 1 x 100\)"
    ):
        Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False).fit()


def test_fp16_on_cpu_is_refused(tmp_path):
    task, model = build("lm", max_steps=STEPS, batch_size=4, precision="fp16")
    with pytest.raises(ConfigError, match="'fp16' needs a CUDA GPU.*use 'bf16'"):
        Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False)


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="accumulate"):
        TrainConfig(accumulate=0)
    with pytest.raises(ConfigError, match="parallel"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")


def _records(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_nproc_hands_the_command_to_torchrun(monkeypatch):
    from tformer import cli
    from tformer.training import distributed

    seen = {}
    monkeypatch.setattr(distributed, "launch", lambda n, argv: seen.update(n=n, argv=argv) or 0)
    argv = ["train", "lm", "--train", "a.txt", "--nproc", "2", "--out", "o", "train.accumulate=2"]
    assert cli.main(argv) == 0
    assert seen == {"n": 2, "argv": ["train", "lm", "--train", "a.txt", "--out", "o", "train.accumulate=2"]}
    assert distributed.without_option(["train", "--nproc=3", "x"], "--nproc") == ["train", "x"]


def test_nproc_below_one_is_an_error(capsys):
    from tformer import cli

    assert cli.main(["train", "lm", "--nproc", "0"]) == 2
    assert "--nproc must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_tformer_train_nproc_2_end_to_end(tmp_path):
    """`tformer train --nproc 2` through torchrun: rank 0 alone writes the log and the checkpoint."""
    import subprocess
    import sys

    (tmp_path / "t.txt").write_text(TEXT * 4)
    cmd = [sys.executable, "-m", "tformer", "train", "lm", "--train", str(tmp_path / "t.txt"), "--nproc", "2"]
    cmd += ["--out", str(tmp_path / "run"), "--no-progress", "data.valid_fraction=0.1", "data.tokenizer=char"]
    cmd += [
        "model.d_model=32",
        "model.n_heads=4",
        "model.d_ff=64",
        "model.n_layers=1",
        "model.max_seq_len=16",
    ]
    cmd += ["train.batch_size=4", "train.max_steps=6", "train.log_every=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("checkpoint:") == 1  # one report, from rank 0
    assert [r["step"] for r in _records(tmp_path / "run")] == [3, 6, 6]
    assert load_trainer_state(tmp_path / "run/checkpoint")["world_size"] == 2
