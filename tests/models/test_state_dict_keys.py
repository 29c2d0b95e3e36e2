"""State-dict keys of every family's model, pinned (KEYS), and the keys tformer <= 0.2 saved (OLD_KEYS,
printed by the code before Seq2Seq had a Decoder and the LM's stack became `blocks`; issue 15): states
saved with either load, into the same tensors."""

import pytest
import torch

from tformer.config import ClassifierConfig, LMConfig, ModelConfig
from tformer.layers import Residual
from tformer.models import Classifier, LanguageModel, Seq2Seq
from tformer.models.legacy import upgrade_names

SMALL = dict(d_model=8, n_heads=2, d_ff=16, n_layers=1, max_seq_len=16)
MODELS = {
    "seq2seq": lambda: Seq2Seq(ModelConfig(**SMALL, src_vocab_size=10, tgt_vocab_size=10)),
    "seq2seq_linformer_prenorm": lambda: Seq2Seq(
        ModelConfig(
            **SMALL,
            src_vocab_size=10,
            tgt_vocab_size=10,
            attention="linformer",
            linformer_rank=4,
            norm_first=True,
        )
    ),
    "lm": lambda: LanguageModel(LMConfig(**SMALL, vocab_size=10)),
    "classifier": lambda: Classifier(
        ClassifierConfig(**SMALL, vocab_size=10, token_types=2, embedding_norm=True, attention_score="cosine")
    ),
}

KEYS = {
    "seq2seq": [
        "encoder.embed.weight",
        "encoder.layers.0.self_attn.in_proj.weight",
        "encoder.layers.0.self_attn.in_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.self_attn.out_proj.bias",
        "encoder.layers.0.ff.linear1.weight",
        "encoder.layers.0.ff.linear1.bias",
        "encoder.layers.0.ff.linear2.weight",
        "encoder.layers.0.ff.linear2.bias",
        "encoder.layers.0.norm1.weight",
        "encoder.layers.0.norm1.bias",
        "encoder.layers.0.norm2.weight",
        "encoder.layers.0.norm2.bias",
        "decoder.embed.weight",
        "decoder.layers.0.self_attn.in_proj.weight",
        "decoder.layers.0.self_attn.in_proj.bias",
        "decoder.layers.0.self_attn.out_proj.weight",
        "decoder.layers.0.self_attn.out_proj.bias",
        "decoder.layers.0.cross_attn.q_proj.weight",
        "decoder.layers.0.cross_attn.q_proj.bias",
        "decoder.layers.0.cross_attn.kv_proj.weight",
        "decoder.layers.0.cross_attn.kv_proj.bias",
        "decoder.layers.0.cross_attn.out_proj.weight",
        "decoder.layers.0.cross_attn.out_proj.bias",
        "decoder.layers.0.ff.linear1.weight",
        "decoder.layers.0.ff.linear1.bias",
        "decoder.layers.0.ff.linear2.weight",
        "decoder.layers.0.ff.linear2.bias",
        "decoder.layers.0.norm1.weight",
        "decoder.layers.0.norm1.bias",
        "decoder.layers.0.norm2.weight",
        "decoder.layers.0.norm2.bias",
        "decoder.layers.0.norm3.weight",
        "decoder.layers.0.norm3.bias",
        "output.weight",
    ],
    "seq2seq_linformer_prenorm": [
        "encoder.embed.weight",
        "encoder.layers.0.self_attn.proj_k",
        "encoder.layers.0.self_attn.proj_v",
        "encoder.layers.0.self_attn.in_proj.weight",
        "encoder.layers.0.self_attn.in_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.self_attn.out_proj.bias",
        "encoder.layers.0.ff.linear1.weight",
        "encoder.layers.0.ff.linear1.bias",
        "encoder.layers.0.ff.linear2.weight",
        "encoder.layers.0.ff.linear2.bias",
        "encoder.layers.0.norm1.weight",
        "encoder.layers.0.norm1.bias",
        "encoder.layers.0.norm2.weight",
        "encoder.layers.0.norm2.bias",
        "encoder.norm.weight",
        "encoder.norm.bias",
        "decoder.embed.weight",
        "decoder.layers.0.self_attn.in_proj.weight",
        "decoder.layers.0.self_attn.in_proj.bias",
        "decoder.layers.0.self_attn.out_proj.weight",
        "decoder.layers.0.self_attn.out_proj.bias",
        "decoder.layers.0.cross_attn.proj_k",
        "decoder.layers.0.cross_attn.proj_v",
        "decoder.layers.0.cross_attn.q_proj.weight",
        "decoder.layers.0.cross_attn.q_proj.bias",
        "decoder.layers.0.cross_attn.kv_proj.weight",
        "decoder.layers.0.cross_attn.kv_proj.bias",
        "decoder.layers.0.cross_attn.out_proj.weight",
        "decoder.layers.0.cross_attn.out_proj.bias",
        "decoder.layers.0.ff.linear1.weight",
        "decoder.layers.0.ff.linear1.bias",
        "decoder.layers.0.ff.linear2.weight",
        "decoder.layers.0.ff.linear2.bias",
        "decoder.layers.0.norm1.weight",
        "decoder.layers.0.norm1.bias",
        "decoder.layers.0.norm2.weight",
        "decoder.layers.0.norm2.bias",
        "decoder.layers.0.norm3.weight",
        "decoder.layers.0.norm3.bias",
        "decoder.norm.weight",
        "decoder.norm.bias",
        "output.weight",
    ],
    "lm": [
        "blocks.embed.weight",
        "blocks.positions.table",
        "blocks.layers.0.self_attn.in_proj.weight",
        "blocks.layers.0.self_attn.in_proj.bias",
        "blocks.layers.0.self_attn.out_proj.weight",
        "blocks.layers.0.self_attn.out_proj.bias",
        "blocks.layers.0.ff.linear1.weight",
        "blocks.layers.0.ff.linear1.bias",
        "blocks.layers.0.ff.linear2.weight",
        "blocks.layers.0.ff.linear2.bias",
        "blocks.layers.0.norm1.weight",
        "blocks.layers.0.norm1.bias",
        "blocks.layers.0.norm2.weight",
        "blocks.layers.0.norm2.bias",
        "blocks.norm.weight",
        "blocks.norm.bias",
        "output.weight",
    ],
    "classifier": [
        "encoder.embed.weight",
        "encoder.type_embed.weight",
        "encoder.embed_norm.weight",
        "encoder.embed_norm.bias",
        "encoder.layers.0.self_attn.score.log_temperature",
        "encoder.layers.0.self_attn.in_proj.weight",
        "encoder.layers.0.self_attn.in_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.self_attn.out_proj.bias",
        "encoder.layers.0.ff.linear1.weight",
        "encoder.layers.0.ff.linear1.bias",
        "encoder.layers.0.ff.linear2.weight",
        "encoder.layers.0.ff.linear2.bias",
        "encoder.layers.0.norm1.weight",
        "encoder.layers.0.norm1.bias",
        "encoder.layers.0.norm2.weight",
        "encoder.layers.0.norm2.bias",
        "head.weight",
        "head.bias",
    ],
}

# The same models' keys as tformer <= 0.2 saved them, before Seq2Seq had a Decoder (decoder_layers.N.*,
# decoder_norm.*, tgt_embed.*, positions.*) and while the LM's stack was called `decoder`.
OLD_KEYS = {
    "seq2seq": [
        "encoder.embed.weight",
        "encoder.layers.0.self_attn.in_proj.weight",
        "encoder.layers.0.self_attn.in_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.self_attn.out_proj.bias",
        "encoder.layers.0.ff.linear1.weight",
        "encoder.layers.0.ff.linear1.bias",
        "encoder.layers.0.ff.linear2.weight",
        "encoder.layers.0.ff.linear2.bias",
        "encoder.layers.0.norm1.weight",
        "encoder.layers.0.norm1.bias",
        "encoder.layers.0.norm2.weight",
        "encoder.layers.0.norm2.bias",
        "tgt_embed.weight",
        "decoder_layers.0.self_attn.in_proj.weight",
        "decoder_layers.0.self_attn.in_proj.bias",
        "decoder_layers.0.self_attn.out_proj.weight",
        "decoder_layers.0.self_attn.out_proj.bias",
        "decoder_layers.0.cross_attn.q_proj.weight",
        "decoder_layers.0.cross_attn.q_proj.bias",
        "decoder_layers.0.cross_attn.kv_proj.weight",
        "decoder_layers.0.cross_attn.kv_proj.bias",
        "decoder_layers.0.cross_attn.out_proj.weight",
        "decoder_layers.0.cross_attn.out_proj.bias",
        "decoder_layers.0.ff.linear1.weight",
        "decoder_layers.0.ff.linear1.bias",
        "decoder_layers.0.ff.linear2.weight",
        "decoder_layers.0.ff.linear2.bias",
        "decoder_layers.0.norm1.weight",
        "decoder_layers.0.norm1.bias",
        "decoder_layers.0.norm2.weight",
        "decoder_layers.0.norm2.bias",
        "decoder_layers.0.norm3.weight",
        "decoder_layers.0.norm3.bias",
        "output.weight",
    ],
    "seq2seq_linformer_prenorm": [
        "encoder.embed.weight",
        "encoder.layers.0.self_attn.proj_k",
        "encoder.layers.0.self_attn.proj_v",
        "encoder.layers.0.self_attn.in_proj.weight",
        "encoder.layers.0.self_attn.in_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.self_attn.out_proj.bias",
        "encoder.layers.0.ff.linear1.weight",
        "encoder.layers.0.ff.linear1.bias",
        "encoder.layers.0.ff.linear2.weight",
        "encoder.layers.0.ff.linear2.bias",
        "encoder.layers.0.norm1.weight",
        "encoder.layers.0.norm1.bias",
        "encoder.layers.0.norm2.weight",
        "encoder.layers.0.norm2.bias",
        "encoder.norm.weight",
        "encoder.norm.bias",
        "tgt_embed.weight",
        "decoder_layers.0.self_attn.in_proj.weight",
        "decoder_layers.0.self_attn.in_proj.bias",
        "decoder_layers.0.self_attn.out_proj.weight",
        "decoder_layers.0.self_attn.out_proj.bias",
        "decoder_layers.0.cross_attn.proj_k",
        "decoder_layers.0.cross_attn.proj_v",
        "decoder_layers.0.cross_attn.q_proj.weight",
        "decoder_layers.0.cross_attn.q_proj.bias",
        "decoder_layers.0.cross_attn.kv_proj.weight",
        "decoder_layers.0.cross_attn.kv_proj.bias",
        "decoder_layers.0.cross_attn.out_proj.weight",
        "decoder_layers.0.cross_attn.out_proj.bias",
        "decoder_layers.0.ff.linear1.weight",
        "decoder_layers.0.ff.linear1.bias",
        "decoder_layers.0.ff.linear2.weight",
        "decoder_layers.0.ff.linear2.bias",
        "decoder_layers.0.norm1.weight",
        "decoder_layers.0.norm1.bias",
        "decoder_layers.0.norm2.weight",
        "decoder_layers.0.norm2.bias",
        "decoder_layers.0.norm3.weight",
        "decoder_layers.0.norm3.bias",
        "decoder_norm.weight",
        "decoder_norm.bias",
        "output.weight",
    ],
    "lm": [
        "decoder.embed.weight",
        "decoder.positions.table",
        "decoder.layers.0.self_attn.in_proj.weight",
        "decoder.layers.0.self_attn.in_proj.bias",
        "decoder.layers.0.self_attn.out_proj.weight",
        "decoder.layers.0.self_attn.out_proj.bias",
        "decoder.layers.0.ff.linear1.weight",
        "decoder.layers.0.ff.linear1.bias",
        "decoder.layers.0.ff.linear2.weight",
        "decoder.layers.0.ff.linear2.bias",
        "decoder.layers.0.norm1.weight",
        "decoder.layers.0.norm1.bias",
        "decoder.layers.0.norm2.weight",
        "decoder.layers.0.norm2.bias",
        "decoder.norm.weight",
        "decoder.norm.bias",
        "output.weight",
    ],
    "classifier": [
        "encoder.embed.weight",
        "encoder.type_embed.weight",
        "encoder.embed_norm.weight",
        "encoder.embed_norm.bias",
        "encoder.layers.0.self_attn.score.log_temperature",
        "encoder.layers.0.self_attn.in_proj.weight",
        "encoder.layers.0.self_attn.in_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.self_attn.out_proj.bias",
        "encoder.layers.0.ff.linear1.weight",
        "encoder.layers.0.ff.linear1.bias",
        "encoder.layers.0.ff.linear2.weight",
        "encoder.layers.0.ff.linear2.bias",
        "encoder.layers.0.norm1.weight",
        "encoder.layers.0.norm1.bias",
        "encoder.layers.0.norm2.weight",
        "encoder.layers.0.norm2.bias",
        "head.weight",
        "head.bias",
    ],
}


@pytest.mark.parametrize("name", list(KEYS))
def test_state_dict_keys_are_pinned(name):
    assert list(MODELS[name]().state_dict()) == KEYS[name]


@pytest.mark.parametrize("name", list(KEYS))
def test_old_keys_map_to_todays(name):
    assert OLD_KEYS.keys() == KEYS.keys()
    renamed = upgrade_names(dict.fromkeys(OLD_KEYS[name]), MODELS[name]())
    assert list(renamed) == KEYS[name]
    assert upgrade_names(dict.fromkeys(KEYS[name]), MODELS[name]()) == dict.fromkeys(KEYS[name])


@pytest.mark.parametrize("name", list(KEYS))
def test_a_state_under_old_keys_loads_strictly(name):
    torch.manual_seed(0)
    saved = MODELS[name]()
    old_names = dict(zip(KEYS[name], OLD_KEYS[name], strict=True))
    old_state = {old_names[k]: v for k, v in saved.state_dict().items()}
    torch.manual_seed(1)
    model = MODELS[name]()
    assert not torch.equal(model.state_dict()[KEYS[name][0]], saved.state_dict()[KEYS[name][0]])
    result = model.load_state_dict(old_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("norm_first", [False, True])
def test_residual_is_add_and_norm(norm_first):
    torch.manual_seed(0)
    unit = Residual(6, norm_first=norm_first, eps=1e-6)
    norm = torch.nn.LayerNorm(6, eps=1e-6)
    assert unit.bias is not None
    with torch.no_grad():
        unit.weight.normal_()
        unit.bias.normal_()
    norm.load_state_dict(unit.state_dict())
    f = torch.nn.Linear(6, 6)
    x = torch.randn(2, 3, 6)
    want = x + f(norm(x)) if norm_first else norm(x + f(x))
    assert torch.equal(unit(x, f), want)
    assert torch.equal(unit.post(x, f(unit.pre(x))), want)
    assert list(Residual(6, bias=False).state_dict()) == ["weight"]
