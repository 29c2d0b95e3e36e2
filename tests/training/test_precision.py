"""bfloat16 autocast training: the loss follows float32's closely; compile is an opt-in (slow test)."""

import pytest
import torch

from tformer.config import LMConfig, TrainConfig
from tformer.data.tokenizers import Tokenizer
from tformer.models import LanguageModel
from tformer.tasks import LanguageModelTask
from tformer.training import Trainer

TEXT = "to be or not to be, that is the question. " * 20


def _train(tmp_path, **train_kw):
    torch.manual_seed(0)
    tok = Tokenizer.train([TEXT], kind="char")
    mc = LMConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=32)
    tc = TrainConfig(
        epochs=1000,
        max_steps=60,
        batch_size=8,
        lr=1e-2,
        warmup_steps=5,
        log_every=20,
        eval_every_epochs=1000,
        **train_kw,
    )
    task = LanguageModelTask(mc, tc, tok, TEXT, TEXT)
    model = LanguageModel(mc)
    history = Trainer(model, task, tc, out_dir=tmp_path, progress=False).fit()
    return [r for r in history if r["type"] == "eval"][-1]["valid_nll"], model


def test_bf16_autocast_training_tracks_fp32(tmp_path):
    fp32, model32 = _train(tmp_path / "a")
    bf16, model16 = _train(tmp_path / "b", precision="bf16")
    assert model16.output.weight.dtype == torch.float32  # master weights stay float32
    # bfloat16 keeps 8 bits of mantissa: over 60 steps the two runs drift apart a little, not far.
    assert abs(bf16 - fp32) < 0.15, (fp32, bf16)
    assert bf16 < 1.5  # it learned (chance is log(14) = 2.6)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    eager, _ = _train(tmp_path / "a")
    compiled, _ = _train(tmp_path / "b", compile=True)
    assert abs(eager - compiled) < 1e-3
