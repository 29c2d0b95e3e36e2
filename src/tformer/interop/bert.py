"""BERT (`BertModel`) -> tformer's Encoder (and so a Classifier's body).

BERT is the paper's post-norm encoder with learned positions, segment (token type) embeddings, a LayerNorm
over the summed embeddings (eps `layer_norm_eps`, 1e-12 in the released models), exact (erf) GELU and no
embedding scaling. Its pooler (dense + tanh over [CLS], trained for next-sentence prediction) has no
counterpart in tformer's classifier, whose head is trained afresh; it is listed as ignored.
"""

from __future__ import annotations

import json

from torch import Tensor

from tformer.config import ClassifierConfig, ConfigError
from tformer.interop.common import HFConfig, Tensors, bert_style_layer

POOLING_FILE = "1_Pooling/config.json"  # sentence-transformers' pooling module, when the model is one


def pooling(cfg: HFConfig) -> str:
    """Mean pooling for a sentence-transformers model that says so, else BERT's [CLS] position."""
    path = cfg.directory / POOLING_FILE
    if not path.exists():
        return "cls"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    if data.get("pooling_mode_cls_token"):
        return "cls"
    modes = [k for k, v in data.items() if k.startswith("pooling_mode") and v]
    raise ConfigError(f"{path}: pooling {modes} cannot be mapped; tformer pools by 'cls' or 'mean'")


def encoder_config(cfg: HFConfig) -> ClassifierConfig:
    """config.json of a BERT model -> the classifier config whose encoder is that model."""
    vocab = cfg.need("vocab_size")
    cfg.expect("position_embedding_type", "absolute", "absolute", "tformer's learned positions are absolute")
    cfg.expect("is_decoder", False, False, "an encoder attends both ways")
    cfg.expect("add_cross_attention", False, False, "an encoder has no cross-attention")
    return ClassifierConfig(
        vocab_size=vocab,
        d_model=cfg.need("hidden_size"),
        n_heads=cfg.need("num_attention_heads"),
        d_ff=cfg.need("intermediate_size"),
        n_layers=cfg.need("num_hidden_layers"),
        dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(cfg.get("attention_probs_dropout_prob", 0.1)),
        max_seq_len=cfg.need("max_position_embeddings"),
        norm_first=False,
        final_norm=False,
        activation=cfg.activation("hidden_act", "gelu"),
        positions="learned",
        scale_embeddings=False,
        bias=True,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        token_types=cfg.need("type_vocab_size"),
        embedding_norm=True,
        pad_id=cfg.token_id("pad_token_id", vocab),
        pooling=pooling(cfg),
    )


def encoder_state(t: Tensors, c: ClassifierConfig) -> dict[str, Tensor]:
    """BERT's tensors -> an Encoder's state dict (names without the classifier's "encoder." prefix)."""
    d, f = c.d_model, c.d_ff
    e = "embeddings"
    state = {
        "embed.weight": t.take(f"{e}.word_embeddings.weight", (c.vocab_size, d)),
        "positions.table": t.take(f"{e}.position_embeddings.weight", (c.max_seq_len, d)),
        "type_embed.weight": t.take(f"{e}.token_type_embeddings.weight", (c.token_types, d)),
        "embed_norm.weight": t.take(f"{e}.LayerNorm.weight", (d,)),
        "embed_norm.bias": t.take(f"{e}.LayerNorm.bias", (d,)),
    }
    t.ignore(f"{e}.position_ids", "buffer of 0..max_position_embeddings-1")
    t.ignore(f"{e}.token_type_ids", "buffer of zeros")
    for i in range(c.n_layers):
        norms = ("attention.output.LayerNorm", "output.LayerNorm")
        state.update(
            bert_style_layer(
                t, f"encoder.layer.{i}", f"layers.{i}", d, f, attention="attention.self", norms=norms
            )
        )
    for part in ("weight", "bias"):
        t.ignore(f"pooler.dense.{part}", "BERT's next-sentence pooler; tformer's classifier head is new")
    return state
