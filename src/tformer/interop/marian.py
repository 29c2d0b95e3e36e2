"""Marian (`MarianMTModel`) -> tformer's Seq2Seq translator.

Marian is the paper's post-norm encoder-decoder (LayerNorm eps 1e-5, no final stack norm, no embedding
LayerNorm) with its own details, each checked against transformers' modeling_marian.py: sinusoidal
positions whose sines fill the first half of the features and cosines the second (not interleaved:
tformer's "sinusoidal_concat"), starting at position 0; embeddings times sqrt(d_model) when
`scale_embedding`; the activation of the config (the released models use "swish" = SiLU); one embedding
shared by encoder, decoder and output (`model.shared`); and a bias on the logits (`final_logits_bias`).
The decoder starts from `decoder_start_token_id`, which is the pad token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tformer.config import Seq2SeqConfig
from tformer.interop.common import HFConfig, InteropError, Tensors, fused_qkv, linear, prefixed
from tformer.positions import sinusoidal_table


def seq2seq_config(cfg: HFConfig) -> Seq2SeqConfig:
    vocab = cfg.need("vocab_size")
    for ours, theirs in (("n_heads", "attention_heads"), ("d_ff", "ffn_dim")):
        enc, dec = cfg.need(f"encoder_{theirs}"), cfg.need(f"decoder_{theirs}")
        if enc != dec:
            raise InteropError(
                f"{cfg.path}: encoder_{theirs} = {enc} and decoder_{theirs} = {dec} differ; "
                f"tformer's {ours} is one value for both stacks"
            )
    cfg.expect("share_encoder_decoder_embeddings", True, True, "tformer shares one embedding here")
    cfg.expect("tie_word_embeddings", True, True, "the output projection is the shared embedding")
    if cfg.get("decoder_vocab_size") not in (None, vocab):
        raise InteropError(
            f"{cfg.path}: decoder_vocab_size = {cfg.get('decoder_vocab_size')} differs from vocab_size = "
            f"{vocab}; a shared embedding needs one vocabulary"
        )
    for key in ("normalize_before", "add_final_layer_norm", "normalize_embedding"):
        cfg.expect(key, False, False, "Marian is post-norm without extra norms")
    return Seq2SeqConfig(
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        d_model=cfg.need("d_model"),
        n_heads=cfg.need("encoder_attention_heads"),
        d_ff=cfg.need("encoder_ffn_dim"),
        n_layers=cfg.need("encoder_layers"),
        n_decoder_layers=cfg.need("decoder_layers"),
        dropout=float(cfg.get("dropout", 0.1)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        max_seq_len=cfg.need("max_position_embeddings"),
        norm_first=False,
        final_norm=False,
        activation=cfg.activation("activation_function", "gelu"),
        positions="sinusoidal_concat",
        scale_embeddings=bool(cfg.get("scale_embedding", False)),
        bias=True,
        layer_norm_eps=1e-5,
        share_embeddings=True,
        tie_output=True,
        output_bias=True,
        pad_id=cfg.token_id("pad_token_id", vocab),
    )


def _attention(t: Tensors, name: str, d: int, *, cross: bool = False) -> dict[str, Tensor]:
    """Marian's q/k/v/out projections -> tformer's: self-attention's one `in_proj` (rows q, k, v), or
    cross-attention's `q_proj` and `kv_proj` (rows k, v)."""
    q, k, v = (linear(t, f"{name}.{n}_proj", d, d) for n in ("q", "k", "v"))
    projections = (
        {**prefixed("q_proj", q), **prefixed("kv_proj", {key: torch.cat([k[key], v[key]]) for key in k})}
        if cross
        else prefixed("in_proj", fused_qkv(q, k, v))
    )
    return {**projections, **prefixed("out_proj", linear(t, f"{name}.out_proj", d, d))}


def _norm(t: Tensors, name: str, d: int) -> dict[str, Tensor]:
    return {"weight": t.take(f"{name}.weight", (d,)), "bias": t.take(f"{name}.bias", (d,))}


def seq2seq_state(t: Tensors, c: Seq2SeqConfig) -> dict[str, Tensor]:
    d, f, v = c.d_model, c.d_ff, c.src_vocab_size
    shared = t.take("model.shared.weight", (v, d))
    for alias in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
        t.take_same(alias, shared, "model.shared.weight")
    table = sinusoidal_table(c.max_seq_len, d, layout="concat")
    for side in ("encoder", "decoder"):  # fixed sinusoids; tformer rebuilds them, so check they agree
        name = f"model.{side}.embed_positions.weight"
        if t.has(name):
            saved = t.take(name, (c.max_seq_len, d))
            if not torch.allclose(saved, table, atol=1e-5):
                raise InteropError(
                    f"{t.source}: tensor '{name}' is not Marian's sinusoid; tformer cannot load it"
                )
    state = {"encoder.embed.weight": shared, "output.bias": t.take("final_logits_bias", (1, v))[0]}
    for i in range(c.n_layers):
        h, o = f"model.encoder.layers.{i}", f"encoder.layers.{i}"
        state.update(prefixed(f"{o}.self_attn", _attention(t, f"{h}.self_attn", d)))
        state.update(prefixed(f"{o}.norm1", _norm(t, f"{h}.self_attn_layer_norm", d)))
        state.update(prefixed(f"{o}.ff.linear1", linear(t, f"{h}.fc1", f, d)))
        state.update(prefixed(f"{o}.ff.linear2", linear(t, f"{h}.fc2", d, f)))
        state.update(prefixed(f"{o}.norm2", _norm(t, f"{h}.final_layer_norm", d)))
    for i in range(c.decoder_layers):
        h, o = f"model.decoder.layers.{i}", f"decoder.layers.{i}"
        state.update(prefixed(f"{o}.self_attn", _attention(t, f"{h}.self_attn", d)))
        state.update(prefixed(f"{o}.norm1", _norm(t, f"{h}.self_attn_layer_norm", d)))
        state.update(prefixed(f"{o}.cross_attn", _attention(t, f"{h}.encoder_attn", d, cross=True)))
        state.update(prefixed(f"{o}.norm2", _norm(t, f"{h}.encoder_attn_layer_norm", d)))
        state.update(prefixed(f"{o}.ff.linear1", linear(t, f"{h}.fc1", f, d)))
        state.update(prefixed(f"{o}.ff.linear2", linear(t, f"{h}.fc2", d, f)))
        state.update(prefixed(f"{o}.norm3", _norm(t, f"{h}.final_layer_norm", d)))
    return state
