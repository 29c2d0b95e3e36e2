"""The paper's encoder-decoder Transformer (section 3, figure 1).

Training is one teacher-forced parallel pass (`forward`); inference encodes once (`encode`), builds a
`DecoderCache` holding every layer's cross-attention keys/values, and feeds one token at a time
(`decode_step`), each step extending the cached self-attention keys/values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from tformer.attention.masks import check_mask, padding_mask
from tformer.attention.multihead import KV
from tformer.config import ModelConfig
from tformer.layers import DecoderLayer, Embedding, EncoderLayer
from tformer.positions import PositionalEncoding


@dataclass
class DecoderCache:
    """Everything incremental decoding keeps between steps; passed in and returned, never stored on modules."""

    cross_kv: list[KV]  # per layer, (B, H, S, D), computed once per source
    memory_mask: Tensor | None  # (B, 1, 1, S)
    self_kv: list[KV | None] = field(default_factory=list)  # per layer, grows by one position per step
    length: int = 0  # target positions already decoded

    def index_select(self, index: Tensor) -> DecoderCache:
        """Keep / reorder batch rows, e.g. the surviving hypotheses of a beam search."""
        return DecoderCache(
            cross_kv=[kv.index_select(index) for kv in self.cross_kv],
            memory_mask=None if self.memory_mask is None else self.memory_mask.index_select(0, index),
            self_kv=[None if kv is None else kv.index_select(index) for kv in self.self_kv],
            length=self.length,
        )


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # (B, T, V)
    encoder_attention: list[Tensor] | None = None  # per layer (B, H, S, S), when asked for
    self_attention: list[Tensor] | None = None  # per layer (B, H, T, T)
    cross_attention: list[Tensor] | None = None  # per layer (B, H, T, S)
    cache: DecoderCache | None = None


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
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contains token id {bad}, outside the vocabulary [0, {vocab_size})")


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer. Inputs are (B, S) source ids and (B, T) target ids, batch first."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.src_embed = Embedding(c.src_vocab_size, c.d_model)
        self.tgt_embed = self.src_embed if c.share_embeddings else Embedding(c.tgt_vocab_size, c.d_model)
        self.positions = PositionalEncoding(c.max_seq_len, c.d_model, learned=c.positions == "learned")
        self.dropout = nn.Dropout(c.dropout)
        layer_args: dict[str, Any] = dict(
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            activation=c.activation,
            norm_first=c.norm_first,
            layer_norm_eps=c.layer_norm_eps,
            backend=c.attention,
        )
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(c.d_model, c.n_heads, c.d_ff, **layer_args) for _ in range(c.n_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(c.d_model, c.n_heads, c.d_ff, **layer_args) for _ in range(c.decoder_layers)
        )
        final = c.use_final_norm
        self.encoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if final else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if final else nn.Identity()
        self.output = nn.Linear(c.d_model, c.tgt_vocab_size, bias=False)
        if c.tie_output:
            self.output.weight = self.tgt_embed.weight
        self._init_linear_weights()

    def _init_linear_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2 and "embed" not in name and not name.startswith("output"):
                nn.init.xavier_uniform_(p)

    # --- encoder -----------------------------------------------------------------------------------
    def source_mask(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """(B, S) ids -> (B, 1, 1, S) bool key mask; a given (B, S) mask is checked and reshaped."""
        if src_mask is None:
            return padding_mask(src, self.config.pad_id)
        if isinstance(src_mask, Tensor) and src_mask.dim() == 2:
            if src_mask.shape != src.shape:
                raise ValueError(
                    f"src_mask has shape {tuple(src_mask.shape)}; expected {tuple(src.shape)} like src"
                )
            src_mask = src_mask[:, None, None, :]
            check_mask(src_mask, b=src.shape[0], t=1, s=src.shape[1], name="src_mask")
            return src_mask
        check_mask(src_mask, b=src.shape[0], t=src.shape[1], s=src.shape[1], name="src_mask")
        return src_mask

    def encode(
        self, src: Tensor, *, src_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """(B, S) ids -> memory (B, S, C), its key mask (B, 1, 1, S), per-layer weights if asked."""
        c = self.config
        check_ids(src, vocab_size=c.src_vocab_size, max_len=c.max_seq_len, name="src")
        mask = self.source_mask(src, src_mask)
        x = self.dropout(self.positions(self.src_embed(src)))
        weights: list[Tensor] | None = [] if need_weights else None
        for layer in self.encoder_layers:
            x, w = layer(x, mask=mask, need_weights=need_weights)
            if weights is not None:
                weights.append(cast(Tensor, w))
        return self.encoder_norm(x), mask, weights

    # --- decoder -----------------------------------------------------------------------------------
    def _check_tgt(self, tgt: Tensor, batch: int, offset: int = 0) -> None:
        c = self.config
        check_ids(tgt, vocab_size=c.tgt_vocab_size, max_len=c.max_seq_len - offset, name="tgt")
        if tgt.shape[0] != batch:
            raise ValueError(f"tgt has batch size {tgt.shape[0]} but src has {batch}; they must match")

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None,
        *,
        tgt_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Seq2SeqOutput:
        """Teacher forcing: all T target positions in one parallel pass, causally masked. -> logits (B, T, V)."""
        self._check_tgt(tgt, memory.shape[0])
        if tgt_mask is not None:
            check_mask(tgt_mask, b=tgt.shape[0], t=tgt.shape[1], s=tgt.shape[1], name="tgt_mask")
        x = self.dropout(self.positions(self.tgt_embed(tgt)))
        self_w: list[Tensor] | None = [] if need_weights else None
        cross_w: list[Tensor] | None = [] if need_weights else None
        for layer in self.decoder_layers:
            o = layer(x, memory, self_mask=tgt_mask, memory_mask=memory_mask, need_weights=need_weights)
            x = o.x
            if self_w is not None and cross_w is not None:
                self_w.append(cast(Tensor, o.self_weights))
                cross_w.append(cast(Tensor, o.cross_weights))
        logits = self.output(self.decoder_norm(x))
        return Seq2SeqOutput(logits, self_attention=self_w, cross_attention=cross_w)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Seq2SeqOutput:
        """src (B, S), tgt (B, T) decoder input (starting with BOS) -> logits (B, T, V) for the next tokens.

        Target padding needs no mask: padded positions come after every real one, so causality already
        hides them from real queries, and the loss ignores them.
        """
        memory, memory_mask, enc_w = self.encode(src, src_mask=src_mask, need_weights=need_weights)
        out = self.decode(tgt, memory, memory_mask, tgt_mask=tgt_mask, need_weights=need_weights)
        out.encoder_attention = enc_w
        return out

    # --- incremental decoding ----------------------------------------------------------------------
    def start_cache(self, memory: Tensor, memory_mask: Tensor | None) -> DecoderCache:
        """Cross-attention keys/values for every decoder layer, computed once per source."""
        return DecoderCache(
            cross_kv=[
                cast(DecoderLayer, layer).cross_attn.project_kv(memory) for layer in self.decoder_layers
            ],
            memory_mask=memory_mask,
            self_kv=[None] * len(self.decoder_layers),
        )

    def decode_step(self, tgt: Tensor, cache: DecoderCache, *, need_weights: bool = False) -> Seq2SeqOutput:
        """Feed the next (B, T) target tokens (usually T = 1) after `cache.length` earlier ones.

        Returns logits (B, T, V) and the extended cache; equal to the matching rows of `decode`.
        """
        batch = cache.cross_kv[0].k.shape[0]
        self._check_tgt(tgt, batch, offset=cache.length)
        x = self.positions(self.tgt_embed(tgt), offset=cache.length)
        self_kv: list[KV | None] = []
        cross_w: list[Tensor] | None = [] if need_weights else None
        for layer, past, cross in zip(self.decoder_layers, cache.self_kv, cache.cross_kv, strict=True):
            o = layer(
                x, None, memory_mask=cache.memory_mask, past=past, cross_kv=cross, need_weights=need_weights
            )
            x = o.x
            self_kv.append(o.self_kv)
            if cross_w is not None:
                cross_w.append(cast(Tensor, o.cross_weights))
        new_cache = DecoderCache(cache.cross_kv, cache.memory_mask, self_kv, cache.length + tgt.shape[1])
        logits = self.output(self.decoder_norm(x))
        return Seq2SeqOutput(logits, cross_attention=cross_w, cache=new_cache)
