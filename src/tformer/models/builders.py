"""Builders: a config into the modules the layers receive (the Annotated Transformer's `make_model`,
torchtune's component builders). The attention keywords are spelled once, in `attention`; layers take the
modules and never see a config.

Modules are made in the order tformer always made them (self-attention, cross-attention, feed-forward),
so a seed gives the same weights as before the layers took injected sublayers.
"""

from __future__ import annotations

from tformer.attention.multihead import MultiHeadAttention
from tformer.config import Seq2SeqConfig, TransformerConfig
from tformer.layers import DecoderLayer, FeedForward, Residual, SelfAttentionLayer
from tformer.positions import RotaryEmbedding


def backend_options(c: TransformerConfig) -> dict[str, int]:
    """Every backend option by its user-facing name (tformer/backends.py); each backend takes its own."""
    return {"window": c.attention_window, "rank": c.linformer_rank, "max_seq_len": c.max_seq_len}


def attention(
    c: TransformerConfig,
    *,
    backend: str | None = None,
    rotary: RotaryEmbedding | None = None,
    cross: bool = False,
) -> MultiHeadAttention:
    """One attention sublayer: `backend` (default `c.attention`), self- or cross-attention."""
    return MultiHeadAttention(
        c.d_model,
        c.n_heads,
        dropout=c.attention_dropout,
        bias=c.bias,
        backend=c.attention if backend is None else backend,
        rotary=rotary,
        # cross-attention takes no options: a linformer cross-attention has always had the default
        # (64, 512) projections whatever linformer_rank says, and saved checkpoints hold those shapes
        backend_options=None if cross else backend_options(c),
        n_kv_heads=c.n_kv_heads,
        score=c.attention_score,
        cross=cross,
    )


def feed_forward(c: TransformerConfig) -> FeedForward:
    return FeedForward(c.d_model, c.d_ff, dropout=c.dropout, activation=c.activation, bias=c.bias)


def residual(c: TransformerConfig) -> Residual:
    """One Add & Norm: post-norm (the paper) or pre-norm (`c.norm_first`)."""
    return Residual(c.d_model, dropout=c.dropout, norm_first=c.norm_first, eps=c.layer_norm_eps, bias=c.bias)


def self_attention_layer(c: TransformerConfig, rotary: RotaryEmbedding | None = None) -> SelfAttentionLayer:
    """Self-attention (`c.attention`) + feed-forward: an encoder layer, or run causally a GPT block."""
    return SelfAttentionLayer(attention(c, rotary=rotary), feed_forward(c), residual(c), residual(c))


def decoder_layer(c: Seq2SeqConfig, rotary: RotaryEmbedding | None = None) -> DecoderLayer:
    """Causal self-attention (`c.decoder_backend`), cross-attention (`c.cross_backend`), feed-forward."""
    return DecoderLayer(
        attention(c, backend=c.decoder_backend, rotary=rotary),
        attention(c, backend=c.cross_backend, cross=True),
        feed_forward(c),
        residual(c),
        residual(c),
        residual(c),
    )
