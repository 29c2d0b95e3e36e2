"""Decoder-only language model (GPT-style; Radford et al., 2018/2019): a causal self-attention stack,
pre-norm, GELU, learned or rotary positions, output projection tied to the embedding.

`forward(ids, cache=...)` runs T new positions after the cached ones and returns the extended cache, so
generation feeds the prompt once and then one token per step. The cache is static: each layer's keys and
values live in buffers of `capacity` positions allocated once (`new_cache`), written in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tformer.attention.kv_cache import DecodingCache, KVCache, RowLengths
from tformer.config import LMConfig
from tformer.models.legacy import Prefixes, upgrade_on_load
from tformer.models.stack import TransformerStack


def cache_capacity(capacity: int | None, max_seq_len: int) -> int:
    """A generation cache's capacity: `capacity` checked to lie in [1, max_seq_len], or max_seq_len."""
    capacity = max_seq_len if capacity is None else capacity
    if not 1 <= capacity <= max_seq_len:
        raise ValueError(f"cache capacity must be in [1, max_seq_len={max_seq_len}], got {capacity}")
    return capacity


@dataclass
class LMCache:
    """Per-layer self-attention keys/values of the positions seen so far (static buffers, `KVCache`).
    Passed in and returned; written in place, so it follows one sequence (`clone` to branch). A
    `DecodingCache` (attention/kv_cache.py).

    Rows may hold different numbers of positions (continuous batching): a forward pass with `lengths`
    (right-padded prompts) leaves each row at its own length, `cat` joins caches of requests that started
    apart, `index_select` drops finished rows; every later step writes and attends each row at its own
    positions. `length` is then the longest row's."""

    kv: list[KVCache]

    @property
    def length(self) -> int:
        return self.kv[0].length

    @property
    def capacity(self) -> int:
        return self.kv[0].capacity

    @property
    def batch_size(self) -> int:
        """Rows held (0 before the first write)."""
        buf = self.kv[0].k_buf
        return 0 if buf is None else buf.shape[0]

    @property
    def lengths(self) -> list[int]:
        """Each row's filled positions."""
        return RowLengths.of(self.kv, self.batch_size)

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Cut rows back to `lengths` positions (a padded step's padding is forgotten)."""
        if len(lengths) != self.batch_size or any(not 0 <= n <= self.capacity for n in lengths):
            raise ValueError(
                f"lengths {list(lengths)} do not fit a cache of {self.batch_size} rows and capacity "
                f"{self.capacity}"
            )
        RowLengths.set(self.kv, lengths)

    def index_select(self, index: Tensor) -> LMCache:
        """A new cache with batch rows `index` (B',), each keeping its length."""
        lengths = self.lengths
        new = LMCache([kv.index_select(index) for kv in self.kv])
        RowLengths.set(new.kv, [lengths[i] for i in index.tolist()])
        return new

    def reorder_(self, index: Tensor) -> None:
        """Reorder batch rows in place (same batch size)."""
        for kv in self.kv:
            kv.reorder_(index)

    def clone(self) -> LMCache:
        return LMCache([kv.clone() for kv in self.kv])

    def clear(self) -> None:
        """Forget every cached position; the buffers stay allocated for reuse."""
        for kv in self.kv:
            kv.clear()

    @staticmethod
    def cat(caches: Sequence[LMCache]) -> LMCache:
        """The rows of `caches`, in order, as one cache (same model and capacity): requests that were
        prefilled apart joining a running batch. Each row keeps its length."""
        if not caches or len({len(c.kv) for c in caches}) != 1:
            raise ValueError("LMCache.cat needs caches of one model (the same number of layers)")
        lengths = [n for c in caches for n in c.lengths]
        new = LMCache([KVCache.cat(layer) for layer in zip(*(c.kv for c in caches), strict=True)])
        RowLengths.set(new.kv, lengths)
        return new


def real_lengths(lengths: Sequence[int] | Tensor, b: int, t: int) -> list[int]:
    """Check per-row real lengths of right-padded ids (B, T): B ints in [1, T]."""
    values = lengths.tolist() if isinstance(lengths, Tensor) else list(lengths)
    if len(values) != b or any(
        isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= t for n in values
    ):
        raise ValueError(f"lengths must be {b} ints in [1, T={t}] (real tokens per row of ids), got {values}")
    return values


@dataclass
class LMOutput:
    logits: Tensor  # (B, T, V)
    cache: DecodingCache | None = None  # an LMCache (RNNLanguageModel: an RNNLMCache)
    attention: list[Tensor] | None = None  # per layer (B, H, T, S), when asked for


class LanguageModel(nn.Module):
    """Embedding + positions -> `blocks` (the self-attention stack, run causally) -> output tied to the
    embedding. ids (B, T), batch first."""

    # tformer <= 0.2 called the stack `decoder` (state-dict keys decoder.layers.N.*, decoder.embed.weight, ...)
    LEGACY_PREFIXES: ClassVar[Prefixes] = (("decoder.", "blocks."),)

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.blocks = TransformerStack(c, c.vocab_size)
        self.output = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_output:
            self.output.weight = self.blocks.embed.weight
        # GPT-2's initialisation: N(0, 0.02) for weights, with the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layers).
        for name, p in self.blocks.layers.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * c.n_layers)
                    if name.endswith(("out_proj.weight", "linear2.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)
        if not c.tie_output:
            nn.init.normal_(self.output.weight, std=0.02)
        upgrade_on_load(self)

    def new_cache(self, capacity: int | None = None) -> LMCache:
        """An empty static cache for up to `capacity` positions (default: max_seq_len). Its buffers,
        (B, n_kv_heads, capacity, d_head) per layer for keys and for values, are allocated by the first
        forward pass that writes to it, with that pass's batch size, dtype and device."""
        capacity = cache_capacity(capacity, self.config.max_seq_len)
        return LMCache([KVCache(capacity) for _ in self.blocks.layers])

    def forward(
        self,
        ids: Tensor,
        *,
        cache: LMCache | None = None,
        use_cache: bool = False,
        need_weights: bool = False,
        last_only: bool = False,
        checked: bool = False,
        lengths: Sequence[int] | Tensor | None = None,
    ) -> LMOutput:
        """ids (B, T) -> next-token logits (B, T, V). With `cache` (or `use_cache`, which starts a cache of
        max_seq_len positions) the T positions follow the cached ones (each row's own, when the cache's
        rows differ), and the cache, extended in place, is returned. `last_only` computes the logits of the
        last position only (B, 1, V): generation needs no others. `checked` skips validating the ids (a
        caller feeding back tokens it chose).

        `lengths` (B,): the real tokens of each row of right-padded ids (prompts of different lengths in
        one batch). Padding follows a row's real tokens, so causality already hides it from them and their
        logits are the row's alone; positions need no shift either. The cache then keeps each row at its own
        length (the padding written past it is overwritten by the row's next tokens and masked until
        then), and `last_only` takes each row's last real position."""
        b, t = ids.shape if ids.dim() == 2 else (0, 0)
        n_real = None if lengths is None else real_lengths(lengths, b, t)
        if cache is None and use_cache:
            cache = self.new_cache()
        before = None if cache is None or n_real is None else cache.lengths or [0] * b
        out = self.blocks(
            ids,
            causal=True,
            past=None if cache is None else cache.kv,
            need_weights=need_weights,
            name="ids",
            checked=checked,
        )
        if cache is not None and before is not None and n_real is not None:
            cache.set_lengths([m + n for m, n in zip(before, n_real, strict=True)])
        x = out.x
        if last_only:
            if n_real is None:
                x = x[:, -1:]
            else:  # (B, 1, C): each row's last real position
                last = torch.tensor(n_real, device=x.device) - 1
                x = x[torch.arange(b, device=x.device), last][:, None]
        return LMOutput(self.output(x), cache, out.weights)
