"""Building blocks of the paper's stacks (section 3): embeddings, feed-forward, encoder and decoder layers.

Layers take plain values, never a config; `models/` builds them from a config. Each sublayer is wrapped as
the paper's Add & Norm, `x = LayerNorm(x + Dropout(sublayer(x)))` (post-norm), or with `norm_first=True`
as `x = x + Dropout(sublayer(LayerNorm(x)))` (pre-norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.attention.multihead import KV, MultiHeadAttention

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class Embedding(nn.Module):
    """Token embedding multiplied by sqrt(d_model) (section 3.4); checks ids against the vocabulary."""

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.vocab_size, self.d_model = vocab_size, d_model
        # std d_model**-0.5: after the sqrt(d_model) scale the embeddings have unit variance, and the
        # tied output projection starts with logits of unit scale.
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * d_model**-0.5)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight) * math.sqrt(self.d_model)  # (B, T, C)


class FeedForward(nn.Module):
    """FFN(x) = W2 act(W1 x + b1) + b2 (section 3.3), with dropout after the activation."""

    def __init__(self, d_model: int, d_ff: int, *, dropout: float = 0.0, activation: str = "relu") -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each inside Add & Norm."""

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
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=attention_dropout, backend=backend)
        self.ff = FeedForward(d_model, d_ff, dropout=dropout, activation=activation)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if self.norm_first:
            attn = self.self_attn(self.norm1(x), mask=mask, need_weights=need_weights)
            x = x + self.dropout1(attn.out)
            x = x + self.dropout2(self.ff(self.norm2(x)))
        else:
            attn = self.self_attn(x, mask=mask, need_weights=need_weights)
            x = self.norm1(x + self.dropout1(attn.out))
            x = self.norm2(x + self.dropout2(self.ff(x)))
        return x, attn.weights


class DecoderLayerOutput(NamedTuple):
    x: Tensor  # (B, T, C)
    self_kv: KV  # keys/values of every target position so far, for the cache
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
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=attention_dropout, backend=backend)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout=attention_dropout, backend=backend)
        self.ff = FeedForward(d_model, d_ff, dropout=dropout, activation=activation)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        *,
        self_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        causal: bool = True,
        past: KV | None = None,
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
        return DecoderLayerOutput(x, sa.kv, ca.kv, sa.weights, ca.weights)
