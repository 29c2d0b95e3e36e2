"""The self-attention stack with its embedding, `TransformerStack`: the paper's encoder (models/encoder.py's
`Encoder`), a classifier's body, and, run with `causal=True` and a KV cache, a decoder-only language
model's blocks (`LanguageModel.blocks`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tformer.attention.kv_cache import KV, KVCache
from tformer.config import TransformerConfig
from tformer.layers import Embedding, dropout_layer, layer_norm
from tformer.models.builders import self_attention_layer
from tformer.models.checkpointing import LayerCheckpointing
from tformer.positions import PositionalEncoding, RotaryEmbedding


class StackOutput(NamedTuple):
    x: Tensor  # (B, T, C), after the final norm when there is one
    weights: list[Tensor] | None  # per layer (B, H, T, S), when asked for


def check_ids(ids: Tensor, *, vocab_size: int, max_len: int, name: str) -> None:
    """Raise a clear error for ids that are not (B, T) integers in [0, vocab_size) with T <= max_len."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; expected (B, T) token ids")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {ids.dtype}")
    if ids.shape[1] > max_len:
        raise ValueError(f"{name} has length {ids.shape[1]}, longer than the model's max_seq_len = {max_len}")
    # The value check reads the ids on the host: eager only, so torch.compile sees one graph without a
    # break (compiled, an out-of-range id still fails inside the embedding lookup), and an exported graph
    # (ONNX), which has no host, carries no check.
    if ids.numel() and not torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contains token id {bad}, outside the vocabulary [0, {vocab_size})")


def row_offsets(past: Sequence[KV | KVCache] | None, t: int) -> int | Tensor:
    """Where T new tokens after the cached ones sit: the first position (int), or each row's own (B, T)
    when the rows of a KV cache hold different lengths (continuous batching)."""
    if past is None:
        return 0
    first = past[0]
    rows = first.positions(t) if isinstance(first, KVCache) else None
    return first.length if rows is None else rows


class TransformerStack(LayerCheckpointing, nn.Module):
    """Embedding (+ positions, dropout) -> N self-attention layers -> optional final LayerNorm.

    Bidirectional it is an encoder (`Encoder`, the same stack under the name of that use); causal with
    `past` caches it is a decoder-only language model's blocks. Caches are written in place (KVCache).
    With `checkpoint_activations` set, training recomputes each layer in backward (models/checkpointing.py);
    a pass with `past` (cached decoding) never does."""

    def __init__(self, c: TransformerConfig, vocab_size: int, *, n_layers: int | None = None) -> None:
        super().__init__()
        self.config, self.vocab_size = c, vocab_size
        self.embed = Embedding(vocab_size, c.d_model, scale=c.scale_embeddings)
        self.positions = PositionalEncoding(c.max_seq_len, c.d_model, kind=c.positions)
        # BERT-style extras, absent by default: segment embeddings and a LayerNorm over the embeddings
        self.type_embed = Embedding(c.token_types, c.d_model, scale=False) if c.token_types else None
        self.embed_norm = (
            layer_norm(c.d_model, c.layer_norm_eps, c.bias) if c.embedding_norm else nn.Identity()
        )
        self.rotary = RotaryEmbedding(c.d_head, c.max_seq_len) if c.positions == "rotary" else None
        self.dropout = dropout_layer(c.dropout)
        n = c.n_layers if n_layers is None else n_layers
        self.layers = nn.ModuleList(self_attention_layer(c, self.rotary) for _ in range(n))
        self.norm = layer_norm(c.d_model, c.layer_norm_eps, c.bias) if c.use_final_norm else nn.Identity()

    def forward(
        self,
        ids: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        past: Sequence[KV | KVCache] | None = None,
        need_weights: bool = False,
        name: str = "ids",
        checked: bool = False,
        token_types: Tensor | None = None,
    ) -> StackOutput:
        """ids (B, T); `past` holds each layer's keys/values of T0 earlier positions (causal decoding);
        `token_types` (B, T) segment ids when the config has token_types (None: all segment 0)."""
        c = self.config
        offset = 0 if past is None else past[0].length  # the longest row's, when rows differ
        if not checked:  # a caller that already validated the ids (Seq2Seq.encode) skips the second pass
            check_ids(ids, vocab_size=self.vocab_size, max_len=c.max_seq_len - offset, name=name)
        x = self.positions(self.embed(ids), row_offsets(past, ids.shape[1]))
        if self.type_embed is not None:
            if token_types is None:
                x = x + self.type_embed.weight[0]
            else:
                if token_types.shape != ids.shape:
                    raise ValueError(
                        f"token_types has shape {tuple(token_types.shape)}; expected {tuple(ids.shape)} like {name}"
                    )
                check_ids(token_types, vocab_size=c.token_types, max_len=ids.shape[1], name="token_types")
                x = x + self.type_embed(token_types)
        elif token_types is not None:
            raise ValueError(
                "token_types given, but the model has no token type embeddings (token_types = 0)"
            )
        x = self.dropout(self.embed_norm(x))
        weights: list[Tensor] | None = [] if need_weights else None
        for i, layer in enumerate(self.layers):
            if past is None:
                o = self.run_layer(layer, x, mask=mask, causal=causal, need_weights=need_weights)
            else:
                o = layer(x, mask=mask, causal=causal, past=past[i], need_weights=need_weights)
            x = o.x
            if weights is not None and o.weights is not None:
                weights.append(o.weights)
        return StackOutput(self.norm(x), weights)
