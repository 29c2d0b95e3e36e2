"""Bad input gets an error that names the problem, never a traceback from deep inside torch."""

import json
import subprocess
import sys

import pytest
import torch

from tformer.attention import MultiHeadAttention
from tformer.cli import main
from tformer.config import ConfigError, ModelConfig, RunConfig, TrainConfig, apply_overrides, load_toml
from tformer.models import Seq2Seq
from tformer.tasks import Translator
from tformer.training import CheckpointError


@pytest.fixture
def model():
    return Seq2Seq(
        ModelConfig(
            src_vocab_size=20, tgt_vocab_size=15, d_model=16, n_heads=4, d_ff=32, n_layers=1, max_seq_len=10
        )
    ).eval()


def test_token_ids_outside_vocabulary(model):
    with pytest.raises(ValueError, match=r"src contains token id 20, outside the vocabulary \[0, 20\)"):
        model(torch.tensor([[3, 20]]), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"tgt contains token id -1"):
        model(torch.tensor([[3, 4]]), torch.tensor([[1, -1]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.tensor([[3.0, 4.0]]), torch.tensor([[1, 2]]))


def test_sequence_longer_than_max(model):
    with pytest.raises(ValueError, match="src has length 11, longer than the model's max_seq_len = 10"):
        model(torch.ones(1, 11, dtype=torch.long), torch.tensor([[1, 2]]))


def test_batch_and_mask_shapes(model):
    src, tgt = torch.tensor([[3, 4, 5]]), torch.tensor([[1, 2], [1, 3]])
    with pytest.raises(ValueError, match="tgt has batch size 2 but src has 1"):
        model(src, tgt)
    with pytest.raises(ValueError, match=r"src_mask has shape \(1, 4\); expected \(1, 3\)"):
        model(src, tgt[:1], src_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"ids.*\(B, T\)|expected \(B, T\) token ids"):
        model(torch.tensor([3, 4]), tgt)
    mha = MultiHeadAttention(16, 4)
    with pytest.raises(
        ValueError, match=r"mask has shape \(2, 1, 1, 5\), which does not broadcast .* dimension S is 5"
    ):
        mha(torch.randn(2, 3, 16), mask=torch.ones(2, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected \(B, T, C=16\)"):
        mha(torch.randn(2, 3, 8))


def test_mask_of_wrong_dtype(model):
    with pytest.raises(TypeError, match="src_mask must have dtype torch.bool.*got torch.float32"):
        model(torch.tensor([[3, 4]]), torch.tensor([[1, 2]]), src_mask=torch.ones(1, 2))
    with pytest.raises(TypeError, match="tgt_mask must have dtype torch.bool"):
        model(torch.tensor([[3, 4]]), torch.tensor([[1, 2]]), tgt_mask=torch.zeros(2, 2, dtype=torch.long))


def test_missing_and_corrupt_checkpoint(tmp_path, model):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        Translator.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Translator.load(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="corrupt config"):
        Translator.load(bad)
    (bad / "config.json").write_text(json.dumps({"task": "translation", "model": model.config.to_dict()}))
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt weights file"):
        Translator.load(bad)
    (bad / "config.json").write_text(json.dumps({"task": "translation", "model": {"d_modle": 3}}))
    with pytest.raises(ConfigError, match="did you mean 'd_model'"):
        Translator.load(bad)


def test_unknown_config_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown Seq2SeqConfig key 'n_head'.*did you mean 'n_heads'"):
        ModelConfig.from_dict({"n_head": 4})
    with pytest.raises(ConfigError, match="did you mean 'warmup_steps'"):
        TrainConfig.from_dict({"warmup_step": 10})
    toml = tmp_path / "run.toml"
    toml.write_text("[model]\nd_model = 64\nn_heads = 4\n[trian]\nepochs = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section '\[trian\]'.*did you mean 'train'"):
        load_toml(toml)
    with pytest.raises(ConfigError, match="did you mean 'dropout'"):
        apply_overrides(RunConfig(), ["dropuot=0.3"])
    with pytest.raises(ConfigError, match="d_model = 100 must be divisible by n_heads = 8"):
        ModelConfig(d_model=100)
    with pytest.raises(ConfigError, match="attention = 'flash' is not one of math, sdpa"):
        ModelConfig(attention="flash")


def test_config_round_trip_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[model]\nd_model = 64\nn_heads = 4\n[train]\nbetas = [0.9, 0.98]\n")
    cfg = apply_overrides(load_toml(toml), ["train.lr=0.001", "n_layers=2", "norm_first=true"])
    assert cfg.model.d_model == 64 and cfg.model.n_layers == 2 and cfg.model.norm_first is True
    assert cfg.train.lr == 0.001 and cfg.train.betas == (0.9, 0.98)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_cli_prints_one_line_errors(tmp_path, capsys):
    assert main(["translate", str(tmp_path / "missing"), "deux"]) == 2
    err = capsys.readouterr().err
    assert "tformer translate: error:" in err and "checkpoint not found" in err
    assert "Traceback" not in err
    proc = subprocess.run(
        [sys.executable, "-m", "tformer", "translate", str(tmp_path)],
        capture_output=True,
        text=True,
        input="",
    )
    assert proc.returncode == 2 and "config.json is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_decoding_inputs_are_checked(model):
    from tformer.inference import beam_search, greedy_decode

    with pytest.raises(ValueError, match=r"src has shape \(3,\); expected \(B, S\) token ids"):
        greedy_decode(model, torch.tensor([3, 4, 5]), bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match=r"eos_id = 99 is outside the target vocabulary \[0, 15\)"):
        beam_search(model, torch.tensor([[3, 4]]), bos_id=1, eos_id=99)


def test_wrong_dtype_activations_are_named():
    mha = MultiHeadAttention(16, 4)
    with pytest.raises(
        TypeError, match="attention input has dtype torch.float64 but the weights are torch.float32"
    ):
        mha(torch.randn(1, 2, 16, dtype=torch.float64))
