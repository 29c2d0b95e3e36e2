"""Decoder-only language model (GPT-style; Radford et al., 2018/2019): a causal self-attention stack,
pre-norm, GELU, learned or rotary positions, output projection tied to the embedding.

`forward(ids, cache=...)` runs T new positions after the cached ones and returns the extended cache, so
generation feeds the prompt once and then one token per step. The cache is static: each layer's keys and
values live in buffers of `capacity` positions allocated once (`new_cache`), written in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from tformer.attention.kv_cache import DecodingCache, KVCache
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
    `DecodingCache` (attention/kv_cache.py)."""

    kv: list[KVCache]

    @property
    def length(self) -> int:
        return self.kv[0].length

    @property
    def capacity(self) -> int:
        return self.kv[0].capacity

    def index_select(self, index: Tensor) -> LMCache:
        """A new cache with batch rows `index` (B',)."""
        return LMCache([kv.index_select(index) for kv in self.kv])

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
    ) -> LMOutput:
        """ids (B, T) -> next-token logits (B, T, V). With `cache` (or `use_cache`, which starts a cache of
        max_seq_len positions) the T positions follow the cached ones, and the cache, extended in place,
        is returned. `last_only` computes the logits of the last position only (B, 1, V): generation needs
        no others. `checked` skips validating the ids (a caller feeding back tokens it chose)."""
        if cache is None and use_cache:
            cache = self.new_cache()
        out = self.blocks(
            ids,
            causal=True,
            past=None if cache is None else cache.kv,
            need_weights=need_weights,
            name="ids",
            checked=checked,
        )
        x = out.x[:, -1:] if last_only else out.x
        return LMOutput(self.output(x), cache, out.weights)
