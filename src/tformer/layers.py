"""Building blocks of the stacks (paper section 3): embeddings, feed-forward, encoder and decoder layers.

Layers take plain values, never a config; `models/` builds them from a config. Each sublayer is wrapped as
the paper's Add & Norm, `x = LayerNorm(x + Dropout(sublayer(x)))` (post-norm), or with `norm_first=True`
as `x = x + Dropout(sublayer(LayerNorm(x)))` (pre-norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.attention.multihead import KV, KVCache, MultiHeadAttention

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "silu": F.silu,  # x * sigmoid(x), "swish" (Marian)
}


class Embedding(nn.Module):
    """Token embedding, multiplied by sqrt(d_model) when `scale` (paper section 3.4)."""

    def __init__(self, vocab_size: int, d_model: int, *, scale: bool = True) -> None:
        super().__init__()
        self.vocab_size, self.d_model = vocab_size, d_model
        self.multiplier = math.sqrt(d_model) if scale else 1.0
        # Scaled: std d_model**-0.5, so embeddings times sqrt(d_model) have unit variance and a tied output
        # projection starts with logits of unit scale. Unscaled (GPT-2 style): std 0.02.
        std = d_model**-0.5 if scale else 0.02
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * std)

    def forward(self, ids: Tensor) -> Tensor:
        out = F.embedding(ids, self.weight)  # (B, T, C)
        return out * self.multiplier if self.multiplier != 1.0 else out


def init_linears_(module: nn.Module, init: Callable[[Tensor], Any]) -> None:
    """`init(weight)` on every linear layer of `module`, in module order. A cross-attention's `q_proj` and
    `kv_proj` are initialised as the one packed (C + 2 C_kv, C) matrix they split, so that an initialisation
    that depends on the shape (Xavier's fan-in + fan-out) sees the layer's full shape as it does for
    self-attention's `in_proj`, and the random draws are those of tformer <= 0.2."""
    done: set[int] = set()
    for m in module.modules():
        if isinstance(m, MultiHeadAttention) and m.cross:
            q, kv = m.q_proj.weight, m.kv_proj.weight
            packed = torch.empty(q.shape[0] + kv.shape[0], q.shape[1], dtype=q.dtype, device=q.device)
            init(packed)
            with torch.no_grad():
                q.copy_(packed[: q.shape[0]])
                kv.copy_(packed[q.shape[0] :])
            done.update((id(m.q_proj), id(m.kv_proj)))
        elif isinstance(m, nn.Linear) and id(m) not in done:
            init(m.weight)


def dropout_layer(p: float) -> nn.Module:
    """Dropout, or nothing at p = 0 (training-mode dropout with p = 0 still draws a random mask)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def layer_norm(d_model: int, eps: float, bias: bool) -> nn.LayerNorm:
    return nn.LayerNorm(d_model, eps=eps, bias=bias)


class FeedForward(nn.Module):
    """FFN(x) = W2 act(W1 x + b1) + b2 (section 3.3), with dropout after the activation."""

    def __init__(
        self, d_model: int, d_ff: int, *, dropout: float = 0.0, activation: str = "relu", bias: bool = True
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = dropout_layer(dropout)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayerOutput(NamedTuple):
    x: Tensor  # (B, T, C)
    kv: KV | KVCache  # self-attention keys/values (with `past`), or `past` itself when it is a KVCache
    weights: Tensor | None  # (B, H, T, S) when asked for


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each inside Add & Norm.

    Bidirectional, it is the paper's encoder layer (and a classifier's); with `causal=True` and a KV cache
    it is the block of a decoder-only language model.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        backend: str = "sdpa",
        rotary: nn.Module | None = None,
        backend_options: dict[str, Any] | None = None,
        n_kv_heads: int | None = None,
        score: str = "dot",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model,
            n_heads,
            dropout=attention_dropout,
            bias=bias,
            backend=backend,
            rotary=rotary,
            backend_options=backend_options,
            n_kv_heads=n_kv_heads,
            score=score,
        )
        self.ff = FeedForward(d_model, d_ff, dropout=dropout, activation=activation, bias=bias)
        self.norm1 = layer_norm(d_model, layer_norm_eps, bias)
        self.norm2 = layer_norm(d_model, layer_norm_eps, bias)
        self.dropout1 = dropout_layer(dropout)
        self.dropout2 = dropout_layer(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        past: KV | KVCache | None = None,
        need_weights: bool = False,
    ) -> EncoderLayerOutput:
        if self.norm_first:
            attn = self.self_attn(
                self.norm1(x), mask=mask, causal=causal, past=past, need_weights=need_weights
            )
            x = x + self.dropout1(attn.out)
            x = x + self.dropout2(self.ff(self.norm2(x)))
        else:
            attn = self.self_attn(x, mask=mask, causal=causal, past=past, need_weights=need_weights)
            x = self.norm1(x + self.dropout1(attn.out))
            x = self.norm2(x + self.dropout2(self.ff(x)))
        assert attn.kv is not None
        return EncoderLayerOutput(x, attn.kv, attn.weights)


class DecoderLayerOutput(NamedTuple):
    x: Tensor  # (B, T, C)
    self_kv: KV | KVCache  # keys/values of every target position so far (the KVCache when one is used)
    cross_kv: KV  # keys/values of the encoder output, computed once per source
    self_weights: Tensor | None
    cross_weights: Tensor | None


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, feed-forward; each in Add & Norm."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        backend: str = "sdpa",
        rotary: nn.Module | None = None,
        backend_options: dict[str, Any] | None = None,
        n_kv_heads: int | None = None,
        score: str = "dot",
        cross_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model,
            n_heads,
            dropout=attention_dropout,
            bias=bias,
            backend=backend,
            rotary=rotary,
            backend_options=backend_options,
            n_kv_heads=n_kv_heads,
            score=score,
        )
        self.cross_attn = MultiHeadAttention(
            d_model,
            n_heads,
            dropout=attention_dropout,
            bias=bias,
            backend=cross_backend,
            # no options: a linformer cross-attention has always had the default (64, 512) projections,
            # whatever the config's linformer_rank (the shapes saved checkpoints hold)
            n_kv_heads=n_kv_heads,
            score=score,
            cross=True,
        )
        self.ff = FeedForward(d_model, d_ff, dropout=dropout, activation=activation, bias=bias)
        self.norm1 = layer_norm(d_model, layer_norm_eps, bias)
        self.norm2 = layer_norm(d_model, layer_norm_eps, bias)
        self.norm3 = layer_norm(d_model, layer_norm_eps, bias)
        self.dropout1 = dropout_layer(dropout)
        self.dropout2 = dropout_layer(dropout)
        self.dropout3 = dropout_layer(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        *,
        self_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        causal: bool = True,
        past: KV | KVCache | None = None,
        cross_kv: KV | None = None,
        need_weights: bool = False,
    ) -> DecoderLayerOutput:
        """x (B, T, C) target states; memory (B, S, C) encoder output (None when `cross_kv` is given)."""

        def self_block(h: Tensor):
            return self.self_attn(h, mask=self_mask, causal=causal, past=past, need_weights=need_weights)

        def cross_block(h: Tensor):
            return self.cross_attn(h, memory, mask=memory_mask, static_kv=cross_kv, need_weights=need_weights)

        if self.norm_first:
            sa = self_block(self.norm1(x))
            x = x + self.dropout1(sa.out)
            ca = cross_block(self.norm2(x))
            x = x + self.dropout2(ca.out)
            x = x + self.dropout3(self.ff(self.norm3(x)))
        else:
            sa = self_block(x)
            x = self.norm1(x + self.dropout1(sa.out))
            ca = cross_block(x)
            x = self.norm2(x + self.dropout2(ca.out))
            x = self.norm3(x + self.dropout3(self.ff(x)))
        assert sa.kv is not None and ca.kv is not None
        return DecoderLayerOutput(x, sa.kv, ca.kv, sa.weights, ca.weights)
