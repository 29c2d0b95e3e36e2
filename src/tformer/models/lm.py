"""Decoder-only language model (GPT-style; Radford et al., 2018/2019): a causal self-attention stack,
pre-norm, GELU, learned or rotary positions, output projection tied to the embedding.

`forward(ids, cache=...)` runs T new positions after the cached ones and returns the extended cache, so
generation feeds the prompt once and then one token per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from tformer.attention.multihead import KV
from tformer.config import LMConfig
from tformer.models.encoder import Encoder


@dataclass
class LMCache:
    """Per-layer self-attention keys/values of the positions seen so far. Passed in and returned."""

    kv: list[KV]

    @property
    def length(self) -> int:
        return self.kv[0].k.shape[2]

    def index_select(self, index: Tensor) -> LMCache:
        return LMCache([kv.index_select(index) for kv in self.kv])


@dataclass
class LMOutput:
    logits: Tensor  # (B, T, V)
    cache: LMCache | None = None
    attention: list[Tensor] | None = None  # per layer (B, H, T, S), when asked for


class LanguageModel(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.decoder = Encoder(c, c.vocab_size)  # the stack, run causally
        self.output = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_output:
            self.output.weight = self.decoder.embed.weight
        # GPT-2's initialisation: N(0, 0.02) for weights, with the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layers).
        for name, p in self.decoder.layers.named_parameters():
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

    def forward(
        self,
        ids: Tensor,
        *,
        cache: LMCache | None = None,
        use_cache: bool = False,
        need_weights: bool = False,
    ) -> LMOutput:
        """ids (B, T) -> next-token logits (B, T, V). With `cache` (or `use_cache`) returns the new cache."""
        out = self.decoder(
            ids, causal=True, past=None if cache is None else cache.kv, need_weights=need_weights, name="ids"
        )
        logits = self.output(out.x)
        new_cache = LMCache(out.kv) if (use_cache or cache is not None) else None
        return LMOutput(logits, new_cache, out.weights)
