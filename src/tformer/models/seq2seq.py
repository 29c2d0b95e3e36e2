"""The paper's encoder-decoder Transformer (section 3, figure 1): `Encoder` + `Decoder` + output projection.

Training is one teacher-forced parallel pass (`forward`); inference encodes once (`encode`), builds a
`DecoderCache` holding every layer's cross-attention keys/values (`start_cache`), and feeds one token at a
time (`decode_step`), each step writing its self-attention keys/values into preallocated buffers
(`KVCache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tformer.attention.kv_cache import DecodingCache
from tformer.attention.masks import check_mask, padding_mask
from tformer.config import Seq2SeqConfig
from tformer.layers import Embedding, init_linears_
from tformer.models.decoder import Decoder, DecoderCache
from tformer.models.encoder import Encoder, check_ids
from tformer.models.legacy import Prefixes, upgrade_on_load


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # (B, T, V)
    encoder_attention: list[Tensor] | None = None  # per layer (B, H, S, S), when asked for
    self_attention: list[Tensor] | None = None  # per layer (B, H, T, T)
    cross_attention: list[Tensor] | None = None  # per layer (B, H, T, S)
    cache: DecodingCache | None = None  # a DecoderCache (RNNSeq2Seq: an RNNDecoderCache)


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer. Inputs are (B, S) source ids and (B, T) target ids, batch first."""

    # tformer <= 0.2 kept the decoder's parts on the model itself (state-dict keys decoder_layers.N.*, ...)
    LEGACY_PREFIXES: ClassVar[Prefixes] = (
        ("decoder_layers.", "decoder.layers."),
        ("decoder_norm.", "decoder.norm."),
        ("tgt_embed.", "decoder.embed."),
        ("positions.", "decoder.positions."),
    )

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c, c.src_vocab_size)
        self.decoder = Decoder(
            c, embed=self.encoder.embed if c.share_embeddings else None, rotary=self.encoder.rotary
        )
        self.output = nn.Linear(c.d_model, c.tgt_vocab_size, bias=c.output_bias)
        if self.output.bias is not None:
            nn.init.zeros_(self.output.bias)
        if c.tie_output:
            self.output.weight = self.decoder.embed.weight
        for layer in [*self.encoder.layers, *self.decoder.layers]:
            init_linears_(layer, nn.init.xavier_uniform_)
        upgrade_on_load(self)

    @property
    def src_embed(self) -> Embedding:
        return self.encoder.embed

    @property
    def tgt_embed(self) -> Embedding:
        """The target embedding (the decoder's; the source's too with share_embeddings)."""
        return self.decoder.embed

    # --- encoder -----------------------------------------------------------------------------------
    def source_mask(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """(B, S) ids -> (B, 1, 1, S) bool key mask (True = real token). A given `src_mask` must be (B, S)."""
        if src_mask is None:
            return padding_mask(src, self.config.pad_id)
        if not isinstance(src_mask, Tensor) or src_mask.dtype != torch.bool:
            check_mask(
                src_mask, b=src.shape[0], t=1, s=src.shape[1], name="src_mask"
            )  # raises the dtype error
        if src_mask.shape != src.shape:
            raise ValueError(
                f"src_mask has shape {tuple(src_mask.shape)}; expected {tuple(src.shape)} like src "
                "(a key-padding mask, True = real token)"
            )
        return src_mask[:, None, None, :]

    def encode(
        self, src: Tensor, *, src_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """(B, S) ids -> memory (B, S, C), its key mask (B, 1, 1, S), per-layer weights if asked."""
        check_ids(src, vocab_size=self.config.src_vocab_size, max_len=self.config.max_seq_len, name="src")
        mask = self.source_mask(src, src_mask)
        out = self.encoder(src, mask=mask, need_weights=need_weights, name="src", checked=True)
        return out.x, mask, out.weights

    # --- decoder -----------------------------------------------------------------------------------
    def _check_tgt(self, tgt: Tensor, batch: int, offset: int = 0) -> None:
        c = self.config
        if offset >= c.max_seq_len:
            raise ValueError(f"cannot decode past the model's max_seq_len = {c.max_seq_len} target positions")
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
        o = self.decoder(tgt, memory, memory_mask, tgt_mask=tgt_mask, need_weights=need_weights)
        return Seq2SeqOutput(self.output(o.x), self_attention=o.self_weights, cross_attention=o.cross_weights)

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
    def start_cache(
        self, memory: Tensor, memory_mask: Tensor | None, *, capacity: int | None = None
    ) -> DecoderCache:
        """Cross-attention keys/values for every decoder layer, computed once per source, and empty static
        self-attention caches for up to `capacity` target positions (default: max_seq_len)."""
        limit = self.config.max_seq_len
        capacity = limit if capacity is None else capacity
        if not 1 <= capacity <= limit:
            raise ValueError(f"cache capacity must be in [1, max_seq_len={limit}], got {capacity}")
        return self.decoder.start_cache(memory, memory_mask, capacity=capacity)

    def decode_step(
        self, tgt: Tensor, cache: DecoderCache, *, need_weights: bool = False, checked: bool = False
    ) -> Seq2SeqOutput:
        """Feed the next (B, T) target tokens (usually T = 1) after `cache.length` earlier ones.

        Returns logits (B, T, V) and the cache, extended in place; equal to the matching rows of `decode`.
        `checked` skips validating `tgt` (a decoding loop feeding back tokens it chose).
        """
        offset = cache.length
        if not checked:
            self._check_tgt(tgt, cache.cross_kv[0].k.shape[0], offset=offset)
        o = self.decoder.step(tgt, cache, need_weights=need_weights)
        return Seq2SeqOutput(self.output(o.x), cross_attention=o.cross_weights, cache=cache)
