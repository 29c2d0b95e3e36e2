"""Building blocks of the stacks (paper section 3): embeddings, feed-forward, Add & Norm, the
self-attention layer (the paper's encoder layer, and run causally a GPT block) and the decoder layer.

Layers take plain values or injected submodules, never a config: a layer receives its attention and
feed-forward sublayers and one `Residual` (Add & Norm) per sublayer; models/builders.py makes them from a
config. `Residual` is the paper's `x = LayerNorm(x + Dropout(sublayer(x)))` (post-norm), or with
`norm_first=True` `x = x + Dropout(sublayer(LayerNorm(x)))` (pre-norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.attention.kv_cache import KV, KVCache
from tformer.attention.multihead import AttentionOutput, MultiHeadAttention

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


def init_linears_(module: nn.Module, init: Callable[[Tensor], object]) -> None:
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


class Residual(nn.Module):
    """Add & Norm around one sublayer (paper sections 3.1 and 5.4; pre-norm: Xiong et al., 2020).

    Post-norm: `LayerNorm(x + Dropout(f(x)))`; pre-norm (`norm_first`): `x + Dropout(f(LayerNorm(x)))`.
    `unit(x, f)` for a sublayer that maps a tensor to a tensor; `pre(x)` and `post(x, y)` around one that
    returns more (attention's keys/values and weights). Its parameters are its LayerNorm's, `weight` and
    `bias`, so a layer's `norm1` keeps the state-dict keys it had as an `nn.LayerNorm`.
    """

    def __init__(
        self,
        d_model: int,
        *,
        dropout: float = 0.0,
        norm_first: bool = False,
        eps: float = 1e-5,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.normalized_shape, self.eps, self.norm_first = (d_model,), eps, norm_first
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.dropout = dropout_layer(dropout)

    def norm(self, x: Tensor) -> Tensor:
        """The LayerNorm alone, computed as `nn.LayerNorm` computes it."""
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def pre(self, x: Tensor) -> Tensor:
        """The sublayer's input: x normalised (pre-norm) or x itself (post-norm)."""
        return self.norm(x) if self.norm_first else x

    def post(self, x: Tensor, y: Tensor) -> Tensor:
        """The residual sum of x and the sublayer's output y (B, T, C), normalised after (post-norm)."""
        x = x + self.dropout(y)
        return x if self.norm_first else self.norm(x)

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        return self.post(x, sublayer(self.pre(x)))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, norm_first={self.norm_first}"


class SelfAttentionLayerOutput(NamedTuple):
    x: Tensor  # (B, T, C)
    kv: KV | KVCache  # self-attention keys/values (with `past`), or `past` itself when it is a KVCache
    weights: Tensor | None  # (B, H, T, S) when asked for


class SelfAttentionLayer(nn.Module):
    """Self-attention then feed-forward, each inside its Add & Norm (`norm1`, `norm2`).

    Bidirectional, it is the paper's encoder layer (and a classifier's); with `causal=True` and a KV cache
    it is the block of a decoder-only language model. Named for what it holds rather than for one of
    those uses; `EncoderLayer` is the same class under its older name.
    """

    def __init__(
        self, self_attn: MultiHeadAttention, ff: nn.Module, norm1: Residual, norm2: Residual
    ) -> None:
        super().__init__()
        self.self_attn, self.ff, self.norm1, self.norm2 = self_attn, ff, norm1, norm2

    @property
    def norm_first(self) -> bool:
        return self.norm1.norm_first

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        past: KV | KVCache | None = None,
        need_weights: bool = False,
    ) -> SelfAttentionLayerOutput:
        attn = self.self_attn(
            self.norm1.pre(x), mask=mask, causal=causal, past=past, need_weights=need_weights
        )
        x = self.norm2(self.norm1.post(x, attn.out), self.ff)
        assert attn.kv is not None
        return SelfAttentionLayerOutput(x, attn.kv, attn.weights)


EncoderLayer = SelfAttentionLayer  # the name of tformer <= 0.2, kept importable
EncoderLayerOutput = SelfAttentionLayerOutput


class DecoderLayerOutput(NamedTuple):
    x: Tensor  # (B, T, C)
    self_kv: KV | KVCache  # keys/values of every target position so far (the KVCache when one is used)
    cross_kv: KV  # keys/values of the encoder output, computed once per source
    self_weights: Tensor | None
    cross_weights: Tensor | None


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, feed-forward; each inside its Add &
    Norm (`norm1`, `norm2`, `norm3`)."""

    def __init__(
        self,
        self_attn: MultiHeadAttention,
        cross_attn: MultiHeadAttention,
        ff: nn.Module,
        norm1: Residual,
        norm2: Residual,
        norm3: Residual,
    ) -> None:
        super().__init__()
        if not cross_attn.cross:
            raise ValueError(
                "DecoderLayer's cross_attn must be built with MultiHeadAttention(..., cross=True)"
            )
        self.self_attn, self.cross_attn, self.ff = self_attn, cross_attn, ff
        self.norm1, self.norm2, self.norm3 = norm1, norm2, norm3

    @property
    def norm_first(self) -> bool:
        return self.norm1.norm_first

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
        sa: AttentionOutput = self.self_attn(
            self.norm1.pre(x), mask=self_mask, causal=causal, past=past, need_weights=need_weights
        )
        x = self.norm1.post(x, sa.out)
        ca: AttentionOutput = self.cross_attn(
            self.norm2.pre(x), memory, mask=memory_mask, static_kv=cross_kv, need_weights=need_weights
        )
        x = self.norm3(self.norm2.post(x, ca.out), self.ff)
        assert sa.kv is not None and isinstance(ca.kv, KV)
        return DecoderLayerOutput(x, sa.kv, ca.kv, sa.weights, ca.weights)
