"""train.init_from for every family (issue 17, item 4): a language model from a tformer LM checkpoint or a
Hugging Face GPT-2, a translator from a tformer translation checkpoint or a Marian model, a vision model
from a vision checkpoint. The run takes the source's tokenizer(s) and architecture, and its model computes
the source's function (logits identical); a source of another family is one error saying what it needs;
LoRA adapts each, and its adapter checkpoint translates from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e .[test])"
)

from support.hf_models import save_gpt2, save_marian  # noqa: E402
from support.images import image_folder, tiny_vision  # noqa: E402
from support.models import ENGLISH, FRENCH, generator, save_generator, save_translator, translator  # noqa: E402
from tformer.cli import main  # noqa: E402
from tformer.config import ConfigError, DataConfig, LMConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from tformer.interop import import_hf, save_imported  # noqa: E402
from tformer.models.vit import VisionTransformer  # noqa: E402
from tformer.tasks import lm, translation, vision  # noqa: E402
from tformer.training.checkpoint import save_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _lm_config(tmp_path: Path, init_from: str, text: str, **model: object) -> RunConfig:
    (tmp_path / "text.txt").write_text(text)
    return RunConfig(
        task="lm",
        model=LMConfig(**{"max_seq_len": 16, "dropout": 0.0, **model}),
        train=TrainConfig(init_from=init_from),
        data=DataConfig(train=(str(tmp_path / "text.txt"),), valid_fraction=0.3, tokenizer="bpe"),
    )


def _mt_config(tmp_path: Path, init_from: str, pairs: list[tuple[str, str]], **train: object) -> RunConfig:
    (tmp_path / "pairs.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    return RunConfig(
        task="translation",
        model=ModelConfig(max_seq_len=32, dropout=0.0),
        train=TrainConfig(init_from=init_from, **train),
        data=DataConfig(train=(str(tmp_path / "pairs.tsv"),), valid=(str(tmp_path / "pairs.tsv"),)),
    )


def _same_function(model: torch.nn.Module, source: torch.nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(model.eval()(*inputs).logits, source.eval()(*inputs).logits)


def test_an_lm_starts_from_a_tformer_lm_checkpoint(tmp_path):
    source = generator(seed=2)
    ckpt = save_generator(source, tmp_path / "lm")
    task, model = lm.build(_lm_config(tmp_path, str(ckpt), " ".join(ENGLISH) * 3))
    assert task.tok.to_str() == source.tok.to_str()  # the source's tokenizer, not one trained on the text
    assert model.config == source.model.config.replace(max_seq_len=16, dropout=0.0)  # the run's choices kept
    assert model.blocks.positions.table.shape[0] == 16  # the first rows of the learned positions
    _same_function(model, source.model, torch.randint(4, source.tok.vocab_size, (2, 16)))
    with pytest.raises(ConfigError, match=r"max_seq_len = 40 is longer than the 24 positions"):
        lm.build(_lm_config(tmp_path, str(ckpt), " ".join(ENGLISH) * 3, max_seq_len=40))


def test_lora_on_an_lm_generates_as_the_trained_model_from_the_command_line(tmp_path, capsys):
    from tformer.pipeline import train
    from tformer.tasks import open_predictor
    from tformer.tasks.lm import TextGenerator

    ckpt = save_generator(generator(seed=2), tmp_path / "lm")
    config = _lm_config(tmp_path, str(ckpt), " ".join(ENGLISH) * 3)
    kw = dict(lora_rank=2, max_steps=3, warmup_steps=0, lr=3e-2, precision="fp32", batch_size=4)
    result = train(config.replace(train=config.train.replace(**kw)), tmp_path / "run", progress=False)
    trained = TextGenerator(result.model, result.task.tok).generate("the ", max_new_tokens=12, greedy=True)
    assert open_predictor(tmp_path / "run").generate("the ", max_new_tokens=12, greedy=True) == trained
    capsys.readouterr()
    assert (
        main(["generate", str(tmp_path / "run"), "--prompt", "the ", "--max-new-tokens", "12", "--greedy"])
        == 0
    )
    assert trained in capsys.readouterr().out


def test_an_lm_starts_from_hugging_face_gpt2(tmp_path):
    directory = save_gpt2(tmp_path / "gpt2")
    imported = import_hf(directory)
    words = " ".join(f"w{i % 50}" for i in range(300))
    task, model = lm.build(_lm_config(tmp_path, f"hf:{directory}", words))
    assert task.tok.to_str() == imported.tokenizer.to_str() and model.config.d_model == 32
    _same_function(model, imported.model, torch.randint(0, 64, (2, 16)))


def test_a_translator_starts_from_a_tformer_translation_checkpoint(tmp_path):
    source = translator(seed=2)
    ckpt = save_translator(source, tmp_path / "mt")
    task, model = translation.build(_mt_config(tmp_path, str(ckpt), list(zip(FRENCH, ENGLISH, strict=True))))
    assert (task.src_tok.to_str(), task.tgt_tok.to_str()) == (
        source.src_tok.to_str(),
        source.tgt_tok.to_str(),
    )
    src, tgt = (
        torch.randint(4, source.src_tok.vocab_size, (2, 7)),
        torch.randint(4, source.tgt_tok.vocab_size, (2, 5)),
    )
    _same_function(model, source.model, src, tgt)


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_marian(tmp_path_factory.mktemp("marian"))


def test_a_translator_starts_from_hugging_face_marian(tmp_path, marian_dir):
    imported = import_hf(marian_dir)
    pairs = [(f"w{i} w{i + 1} w{i + 3}", f"w{i + 2} w{i}") for i in range(12)]
    task, model = translation.build(_mt_config(tmp_path, f"hf:{marian_dir}", pairs))
    assert task.src_tok.to_str() == task.tgt_tok.to_str() == imported.tokenizer.to_str()
    _same_function(model, imported.model, torch.randint(1, 63, (2, 7)), torch.randint(1, 63, (2, 5)))


def test_lora_on_marian_translates_from_the_command_line_and_merges_to_its_keys(tmp_path, marian_dir):
    from tformer.pipeline import train

    pairs = [(f"w{i} w{i + 1} w{i + 3}", f"w{i + 2} w{i}") for i in range(12)]
    kw = dict(lora_rank=2, max_steps=2, warmup_steps=0, lr=1e-2, precision="fp32", eval_max_sentences=2)
    train(_mt_config(tmp_path, f"hf:{marian_dir}", pairs, **kw), tmp_path / "run", progress=False)
    adapted = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["lora"]["targets"]
    assert any(t.endswith("cross_attn.kv_proj") for t in adapted)  # the decoder's cross-attention too
    assert main(["translate", str(tmp_path / "run"), "w4 w5 w7"]) == 0
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    save_imported(import_hf(marian_dir), tmp_path / "base")  # the base as a tformer checkpoint writes it
    keys = [set(load_file(str(tmp_path / d / "model.safetensors"))) for d in ("merged", "base")]
    assert keys[0] == keys[1]


def test_a_vision_model_starts_from_a_vision_checkpoint(tmp_path):
    torch.manual_seed(4)
    source = VisionTransformer(tiny_vision(channels=1, n_classes=3))
    norm = {"mean": [0.3], "std": [0.2]}
    config = {
        "task": "vision",
        "model": source.config.to_dict(),
        "classes": ["a", "b", "c"],
        "normalisation": norm,
    }
    ckpt = save_checkpoint(tmp_path / "vit", model=source, config=config)
    image_folder(tmp_path / "images", {"cat": 3, "dog": 3})
    run = RunConfig(
        task="vision",
        train=TrainConfig(init_from=str(ckpt)),
        data=DataConfig(train=(str(tmp_path / "images"),), valid=(str(tmp_path / "images"),)),
    )
    task, model = vision.build(run)  # the run's default model (28 x 28) gives way to the source's 8 x 8
    assert model.config.image_size == 8 and model.config.n_classes == 2 and task.norm.to_dict() == norm
    own, theirs = model.state_dict(), source.state_dict()
    assert set(own) == set(theirs)
    assert all(torch.equal(own[k], theirs[k]) for k in own if not k.startswith("head."))  # a new head


def test_a_source_of_another_family_is_one_error(tmp_path, marian_dir):
    ckpt = save_translator(translator(seed=2), tmp_path / "mt")
    with pytest.raises(
        ConfigError, match=r"a 'translation' checkpoint; a 'lm' run starts from an 'lm' checkpoint"
    ):
        lm.build(_lm_config(tmp_path, str(ckpt), " ".join(ENGLISH) * 3))
    with pytest.raises(ConfigError, match=r"a marian model; an lm model starts from a GPT-2"):
        lm.build(_lm_config(tmp_path, f"hf:{marian_dir}", " ".join(ENGLISH) * 3))
    with pytest.raises(ConfigError, match=r"model.architecture = 'lstm' is a baseline"):
        lm.build(_lm_config(tmp_path, str(ckpt), " ".join(ENGLISH) * 3, architecture="lstm"))
