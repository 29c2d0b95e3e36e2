"""tformer average (issue 17, item 2): checkpoints' weights averaged in float64 (fairseq's
average_checkpoints): K copies of one are it exactly, two known ones average exactly, tensors that are not
floating point come from the newest, different models are refused naming both; the CLI end to end (train,
average the last 2, evaluate the average; a checkpoint's moving average as a checkpoint of its own)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.models import classifier, save_classifier
from tformer.cli import main
from tformer.tasks import open_predictor
from tformer.training import run_dir
from tformer.training.average import average_checkpoints, average_weights, last_checkpoints
from tformer.training.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_k_copies_of_one_state_average_to_it_bit_for_bit(k):
    g = torch.Generator().manual_seed(k)
    state = {
        dtype.__repr__(): (torch.randn(64, generator=g) * 1e3).to(dtype)
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    }
    state["num_batches_tracked"] = torch.tensor(17)
    out = average_weights([state] * k)
    for key, value in state.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value), key


def test_k_copies_of_one_checkpoint_average_to_it(tmp_path):
    ckpt = save_classifier(classifier(seed=1), tmp_path / "a")
    out = average_checkpoints([ckpt] * 3, tmp_path / "avg")
    a, b = _weights(ckpt), _weights(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert not (out / "trainer_state.json").exists()
    assert json.loads((out / "averaged.json").read_text())["checkpoints"] == [str(ckpt)] * 3


def test_two_known_checkpoints_average_exactly(tmp_path):
    one, two = classifier(seed=1), classifier(seed=2)
    with torch.no_grad():
        one.model.head.weight.fill_(0.25)
        two.model.head.weight.fill_(1.0)
    a, b = save_classifier(one, tmp_path / "a"), save_classifier(two, tmp_path / "b")
    out = average_checkpoints([a, b], tmp_path / "avg")
    avg, wa, wb = _weights(out), _weights(a), _weights(b)
    assert torch.equal(avg["head.weight"], torch.full_like(wa["head.weight"], 0.625))
    for key in wa:
        assert torch.equal(avg[key], ((wa[key].double() + wb[key].double()) / 2).float()), key
    assert not torch.equal(
        avg["encoder.layers.0.ff.linear1.weight"], wa["encoder.layers.0.ff.linear1.weight"]
    )
    predictor = open_predictor(out)  # a checkpoint of its own
    assert torch.equal(predictor.model.head.weight, avg["head.weight"])


def test_tensors_that_are_not_floating_point_come_from_the_newest():
    old = {"w": torch.tensor([1.0, 2.0]), "num_batches_tracked": torch.tensor(3)}
    new = {"w": torch.tensor([3.0, 5.0]), "num_batches_tracked": torch.tensor(8)}
    out = average_weights([old, new])
    assert torch.equal(out["w"], torch.tensor([2.0, 3.5])) and int(out["num_batches_tracked"]) == 8


def test_different_models_are_refused_naming_both_and_the_difference(tmp_path):
    a = save_classifier(classifier(seed=1), tmp_path / "a")
    b = save_classifier(classifier(seed=1, d_ff=48), tmp_path / "b")
    with pytest.raises(
        CheckpointError, match=rf"{a} and {b} are not the same model \(model.d_ff = 64 vs 48\)"
    ):
        average_checkpoints([a, b], tmp_path / "avg")
    c = tmp_path / "c"
    shutil.copytree(a, c)
    weights = _weights(c)
    weights["head.bias"] = torch.zeros(3)
    save_file(weights, str(c / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"not the same model \(tensor head.bias: \(2,\) torch.float32 vs \(3,\)"
    ):
        average_checkpoints([a, c], tmp_path / "avg")
    del weights["head.bias"]
    save_file(weights, str(c / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"\(tensor head.bias only in {a}\)"):
        average_checkpoints([a, c], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def test_out_is_not_replaced_without_overwrite(tmp_path):
    a = save_classifier(classifier(seed=1), tmp_path / "a")
    out = average_checkpoints([a], tmp_path / "avg")
    with pytest.raises(CheckpointError, match="avg: exists; give --overwrite"):
        average_checkpoints([a], out)
    with pytest.raises(CheckpointError, match="is one of the checkpoints being averaged"):
        average_checkpoints([a], a, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not a tformer checkpoint; refusing to replace it"):
        average_checkpoints([a], tmp_path / "mine", overwrite=True)
    assert average_checkpoints([a, a], out, overwrite=True) == out


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_train_average_the_last_two_and_evaluate(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("the cat sat on the mat.\n" * 60)
    run = tmp_path / "run"
    code, _, err = _run(
        ["train", "lm", "--train", str(tmp_path / "t.txt"), "--out", str(run), "--no-progress",
         "data.tokenizer=char", "data.valid_fraction=0.2", "model.max_seq_len=32", "model.d_model=32",
         "model.n_heads=4", "model.d_ff=64", "model.n_layers=1", "train.max_steps=30", "train.epochs=100",
         "train.eval_every_epochs=100", "train.batch_size=8", "train.lr=0.01", "train.warmup_steps=5",
         "train.save_every_steps=10", "train.keep_checkpoints=2", "train.ema=0.9"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    kept = run_dir.checkpoints(run)
    assert [p.name for p in kept] == ["checkpoint-20", "checkpoint-30"]
    code, out, err = _run(["average", str(run), "--last", "2", str(tmp_path / "avg")], capsys)
    assert code == 0, err
    assert f"checkpoint: {tmp_path / 'avg'}" in out
    a, b, avg = (_weights(p) for p in (*kept, tmp_path / "avg"))
    assert all(torch.equal(avg[k], ((a[k].double() + b[k].double()) / 2).float()) for k in a)
    code, out, err = _run(["eval", str(tmp_path / "avg"), "--data", str(tmp_path / "t.txt")], capsys)
    assert code == 0 and "perplexity:" in out, err
    # fewer checkpoints than asked: said, with what the run keeps
    code, _, err = _run(["average", str(run), "--last", "3", str(tmp_path / "avg3")], capsys)
    assert code == 2 and "2 checkpoint(s) (checkpoint-20, checkpoint-30), fewer than --last 3" in err
    assert "train.keep_checkpoints = 2" in err and not (tmp_path / "avg3").exists()
    code, _, err = _run(["average", str(run), "--last", "2", str(tmp_path / "avg")], capsys)
    assert code == 2 and "exists; give --overwrite" in err
    # the moving average of the latest checkpoint, as a checkpoint: its weights are ema.safetensors
    latest = run / "checkpoint"
    code, out, err = _run(["average", str(latest), str(tmp_path / "ema"), "--ema"], capsys)
    assert code == 0, err
    ema, saved = _weights(tmp_path / "ema"), load_file(str(kept[-1] / "ema.safetensors"))
    assert set(ema) == set(saved) and all(torch.equal(ema[k], saved[k]) for k in ema)
    assert not all(torch.equal(ema[k], b[k]) for k in ema)
    code, out, err = _run(["eval", str(tmp_path / "ema"), "--data", str(tmp_path / "t.txt")], capsys)
    assert code == 0 and "perplexity:" in out, err
    code, _, err = _run(["average", str(run), str(tmp_path / "x")], capsys)
    assert code == 2 and "a run directory; average its newest checkpoints with --last K" in err


def test_last_checkpoints_needs_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        last_checkpoints(tmp_path, 2)
    with pytest.raises(ValueError, match="--last 0: expected at least 1"):
        last_checkpoints(tmp_path, 0)
