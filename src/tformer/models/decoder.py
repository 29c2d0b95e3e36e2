"""The paper's decoder (section 3.1, figure 1's right half): target embedding (+ positions, dropout) -> N
layers of masked self-attention, cross-attention over the encoder output and feed-forward -> optional final
LayerNorm. `Seq2Seq` is `Encoder` + `Decoder` + the output projection.

Two ways to run it: all T target positions in one causally masked pass (`forward`, teacher forcing), or a
few positions at a time after the cached ones (`step`), with a `DecoderCache` made by `start_cache`: every
layer's cross-attention keys/values computed once per source, and static self-attention buffers
(`KVCache`) that each step writes in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.attention.kv_cache import KV, KVCache, RowLengths
from tformer.config import Seq2SeqConfig
from tformer.layers import DecoderLayer, Embedding, dropout_layer, layer_norm
from tformer.models.builders import decoder_layer
from tformer.models.checkpointing import LayerCheckpointing
from tformer.models.stack import row_offsets
from tformer.positions import PositionalEncoding, RotaryEmbedding


@dataclass
class DecoderCache:
    """Everything incremental decoding keeps between steps; passed in and returned, never stored on modules.
    The self-attention part is static (preallocated, written in place), so a cache follows one decode
    (`clone()` to branch). A `DecodingCache` (attention/kv_cache.py).

    Rows may be at different target lengths (continuous batching: `cat` joins sources that started later,
    `index_select` drops finished ones); each step then writes and attends each row at its own position."""

    cross_kv: list[KV]  # per layer, (B, H_kv, S, D), computed once per source
    memory_mask: Tensor | None  # (B, 1, 1, S)
    self_kv: list[KVCache]  # per layer, buffers (B, H_kv, capacity, D); one position written per step

    @property
    def length(self) -> int:
        """Target positions already decoded (the longest row's, when rows differ)."""
        return self.self_kv[0].length

    @property
    def batch_size(self) -> int:
        return self.cross_kv[0].k.shape[0]

    @property
    def lengths(self) -> list[int]:
        """Each row's decoded target positions."""
        return RowLengths.of(self.self_kv, self.batch_size)

    def index_select(self, index: Tensor) -> DecoderCache:
        """A new cache with batch rows `index` (B', any B'): e.g. one source repeated for its K beams."""
        lengths = self.lengths
        new = DecoderCache(
            cross_kv=[kv.index_select(index) for kv in self.cross_kv],
            memory_mask=None if self.memory_mask is None else self.memory_mask.index_select(0, index),
            self_kv=[kv.index_select(index) for kv in self.self_kv],
        )
        RowLengths.set(new.self_kv, [lengths[i] for i in index.tolist()])
        return new

    def reorder_(self, index: Tensor) -> None:
        """Reorder the self-attention rows in place (beam search: beams move within their source, whose
        K rows share the same cross-attention keys/values, so those stay as they are)."""
        for kv in self.self_kv:
            kv.reorder_(index)

    def clone(self) -> DecoderCache:
        """A copy that can be decoded on independently (the cross-attention part, never written, is shared)."""
        return DecoderCache(list(self.cross_kv), self.memory_mask, [kv.clone() for kv in self.self_kv])

    @staticmethod
    def cat(caches: Sequence[DecoderCache]) -> DecoderCache:
        """The rows of `caches` in order, as one cache (each already decoded at least one step): sources
        of different lengths S, so each one's cross-attention keys/values and memory mask are padded to the
        longest (padded keys masked out), and each row keeps its target length."""
        if not caches:
            raise ValueError("DecoderCache.cat needs at least one cache")
        s = max(c.cross_kv[0].k.shape[2] for c in caches)

        def widen(x: Tensor) -> Tensor:  # keys or values (B, H_kv, S_i, D) -> (B, H_kv, S, D), zeros after
            return x if x.shape[-2] == s else F.pad(x, (0, 0, 0, s - x.shape[-2]))

        masks = []
        for c in caches:
            device, width = c.cross_kv[0].k.device, c.cross_kv[0].k.shape[2]
            mask = c.memory_mask
            if mask is None:  # every key real
                mask = torch.ones(c.batch_size, 1, 1, width, dtype=torch.bool, device=device)
            mask = mask.expand(c.batch_size, 1, 1, width)
            masks.append(torch.cat([mask, mask.new_zeros(c.batch_size, 1, 1, s - width)], dim=-1))
        cross = [
            KV(torch.cat([widen(kv.k) for kv in layer]), torch.cat([widen(kv.v) for kv in layer]))
            for layer in zip(*(c.cross_kv for c in caches), strict=True)
        ]
        lengths = [n for c in caches for n in c.lengths]
        self_kv = [KVCache.cat(layer) for layer in zip(*(c.self_kv for c in caches), strict=True)]
        RowLengths.set(self_kv, lengths)
        return DecoderCache(cross, torch.cat(masks), self_kv)


class DecoderOutput(NamedTuple):
    x: Tensor  # (B, T, C), after the final norm when there is one
    self_weights: list[Tensor] | None  # per layer (B, H, T, T0 + T), when asked for
    cross_weights: list[Tensor] | None  # per layer (B, H, T, S), when asked for


def _cross_attending(layer: nn.Module) -> DecoderLayer:
    if not isinstance(layer, DecoderLayer):
        raise TypeError(f"a Decoder's layers are DecoderLayers; found a {type(layer).__name__}")
    return layer


class Decoder(LayerCheckpointing, nn.Module):
    """Target embedding (shared with the encoder when `embed` is given) + positions + dropout -> N
    `DecoderLayer`s -> optional final norm. Inputs are batch first: tgt (B, T), memory (B, S, C). With
    `checkpoint_activations` set, teacher-forced training recomputes each layer in backward
    (models/checkpointing.py); `step` never does."""

    def __init__(
        self, c: Seq2SeqConfig, *, embed: Embedding | None = None, rotary: RotaryEmbedding | None = None
    ) -> None:
        super().__init__()
        # Made in the order Seq2Seq made them before it had a Decoder, so a seed gives the same weights.
        self.embed = (
            Embedding(c.tgt_vocab_size, c.d_model, scale=c.scale_embeddings) if embed is None else embed
        )
        self.positions = PositionalEncoding(c.max_seq_len, c.d_model, kind=c.positions)
        self.dropout = dropout_layer(c.dropout)
        self.layers = nn.ModuleList(decoder_layer(c, rotary) for _ in range(c.decoder_layers))
        self.norm = layer_norm(c.d_model, c.layer_norm_eps, c.bias) if c.use_final_norm else nn.Identity()

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None,
        *,
        tgt_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> DecoderOutput:
        """Teacher forcing: all T positions of tgt (B, T) in one parallel pass, causally masked."""
        x = self.dropout(self.positions(self.embed(tgt)))
        self_w: list[Tensor] | None = [] if need_weights else None
        cross_w: list[Tensor] | None = [] if need_weights else None
        for layer in self.layers:
            o = self.run_layer(
                layer, x, memory, self_mask=tgt_mask, memory_mask=memory_mask, need_weights=need_weights
            )
            x = o.x
            if self_w is not None and cross_w is not None:
                assert o.self_weights is not None and o.cross_weights is not None
                self_w.append(o.self_weights)
                cross_w.append(o.cross_weights)
        return DecoderOutput(self.norm(x), self_w, cross_w)

    def start_cache(self, memory: Tensor, memory_mask: Tensor | None, *, capacity: int) -> DecoderCache:
        """Every layer's cross-attention keys/values of memory (B, S, C), and empty static self-attention
        caches of `capacity` target positions."""
        return DecoderCache(
            cross_kv=[_cross_attending(layer).cross_attn.project_kv(memory) for layer in self.layers],
            memory_mask=memory_mask,
            self_kv=[KVCache(capacity) for _ in self.layers],
        )

    def step(self, tgt: Tensor, cache: DecoderCache, *, need_weights: bool = False) -> DecoderOutput:
        """The next (B, T) target positions after `cache.length` earlier ones; the cache is extended in
        place. Equal to the matching rows of `forward`. Self-attention weights are not returned."""
        x = self.dropout(self.positions(self.embed(tgt), offset=row_offsets(cache.self_kv, tgt.shape[1])))
        cross_w: list[Tensor] | None = [] if need_weights else None
        for layer, past, cross in zip(self.layers, cache.self_kv, cache.cross_kv, strict=True):
            o = layer(
                x, None, memory_mask=cache.memory_mask, past=past, cross_kv=cross, need_weights=need_weights
            )
            x = o.x
            if cross_w is not None:
                assert o.cross_weights is not None
                cross_w.append(o.cross_weights)
        return DecoderOutput(self.norm(x), None, cross_w)
