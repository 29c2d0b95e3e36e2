"""Multi-head attention (paper section 3.2.2): projections, split/merge heads, the KV cache, a backend."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.attention.backends import get_backend
from tformer.attention.masks import check_mask
from tformer.attention.scores import AttentionScore, check_score


class KV(NamedTuple):
    """Projected keys and values of one attention layer, (B, H, S, D) each. Keys are stored as the kernel
    consumes them: after rotary positions and the score's key transform (attention/scores.py; unit keys for
    "cosine", (B, H, S, D + 1) augmented keys for "l2")."""

    k: Tensor
    v: Tensor

    def index_select(self, index: Tensor) -> KV:
        """Keep / reorder batch rows (beam search): index (B',) -> KV with batch B'."""
        return KV(self.k.index_select(0, index), self.v.index_select(0, index))


class AttentionOutput(NamedTuple):
    out: Tensor  # (B, T, C)
    weights: Tensor | None  # (B, H, T, S) when asked for
    kv: KV | None  # keys and values attended to, for the caller's cache


class MultiHeadAttention(nn.Module):
    """Multi-head attention. The q, k, v projections are one (3C, C) matrix `in_proj` (rows: q, then k,
    then v), so self-attention does one matrix product for all three, as torch.nn.MultiheadAttention does.

    `forward(x, memory=None)` attends from x (B, T, C) to `memory` (B, S, C), or to x itself when memory is
    None. Cached decoding passes `past` (the KV of earlier positions, extended with this step's) or
    `static_kv` (cross-attention keys/values computed once per source by `project_kv`). `score` picks the
    score function ("dot", "cosine", "l2"; attention/scores.py).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        backend: str = "sdpa",
        rotary: nn.Module | None = None,
        backend_options: dict[str, Any] | None = None,
        n_kv_heads: int | None = None,
        score: str = "dot",
    ) -> None:
        super().__init__()
        check_score(score, backend)
        self.rotary = rotary  # rotary positions for self-attention (shared, holds no parameters)
        if d_model % n_heads:
            raise ValueError(f"d_model = {d_model} must be divisible by n_heads = {n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        # Grouped-query attention (Ainslie et al., 2023): n_kv_heads key/value heads, each shared by
        # n_heads / n_kv_heads query heads; 1 is multi-query attention (Shazeer, 2019). The KV cache shrinks
        # by the same factor.
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if self.n_kv_heads < 1 or n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads = {n_kv_heads} must divide n_heads = {n_heads}")
        self.kv_dim = self.n_kv_heads * self.d_head
        self.dropout = dropout
        self.backend = get_backend(backend)
        # only the options this backend takes (e.g. the window of "local")
        self.backend_options = {k: v for k, v in (backend_options or {}).items() if k in self.backend.options}
        self.score = AttentionScore(score, n_heads, self.d_head)
        self.in_proj = nn.Linear(d_model, d_model + 2 * self.kv_dim, bias=bias)  # rows: q, k, v
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        if self.backend.name == "linformer":  # its learned sequence projections E and F (rank, max_seq_len)
            opts = backend_options or {}
            rank, max_len = int(opts.get("rank", 64)), int(opts.get("max_seq_len", 512))
            self.proj_k = nn.Parameter(torch.randn(rank, max_len) / math.sqrt(max_len))
            self.proj_v = nn.Parameter(torch.randn(rank, max_len) / math.sqrt(max_len))

    def _options(self) -> dict[str, Any]:
        if self.backend.name == "linformer":
            return {"proj_k": self.proj_k, "proj_v": self.proj_v}
        return self.backend_options

    def _split(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        return x.view(b, t, c // self.d_head, self.d_head).transpose(1, 2)  # (B, H or H_kv, T, D)

    def _project(self, x: Tensor, part: slice) -> Tensor:
        bias = None if self.in_proj.bias is None else self.in_proj.bias[part]
        return F.linear(x, self.in_proj.weight[part], bias)

    def project_kv(self, memory: Tensor) -> KV:
        """(B, S, C) -> keys and values (B, H, S, D); computed once per source for cross-attention."""
        k, v = self._project(memory, slice(self.d_model, None)).chunk(2, dim=-1)  # (B, S, H_kv * D) each
        return KV(self.score.keys(self._split(k)), self._split(v))

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        past: KV | None = None,
        static_kv: KV | None = None,
        need_weights: bool = False,
    ) -> AttentionOutput:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"attention input has shape {tuple(x.shape)}; expected (B, T, C={self.d_model})")
        if x.dtype != self.in_proj.weight.dtype:
            raise TypeError(
                f"attention input has dtype {x.dtype} but the weights are {self.in_proj.weight.dtype}"
            )
        b, t, c = x.shape
        if memory is None and static_kv is None:
            # self-attention: one product for q, k and v
            q, k, v = self.in_proj(x).split([self.d_model, self.kv_dim, self.kv_dim], dim=-1)
            q, k, v = self._split(q), self._split(k), self._split(v)  # (B, H, T, D)
            if self.rotary is not None:
                offset = 0 if past is None else past.k.shape[2]
                q, k = self.rotary(q, offset), self.rotary(k, offset)
            kv = KV(self.score.keys(k), v)
        else:
            q = self._split(self._project(x, slice(0, c)))  # (B, H, T, D)
            if static_kv is not None:
                kv = static_kv
            else:
                assert memory is not None
                if memory.dim() != 3 or memory.shape[0] != b or memory.shape[-1] != c:
                    raise ValueError(
                        f"attention memory has shape {tuple(memory.shape)}; expected (B={b}, S, C={c})"
                    )
                if memory.dtype != x.dtype:
                    raise TypeError(
                        f"attention memory has dtype {memory.dtype} but the queries have {x.dtype}"
                    )
                kv = self.project_kv(memory)
        if past is not None:
            kv = KV(torch.cat([past.k, kv.k], dim=2), torch.cat([past.v, kv.v], dim=2))
        s = kv.k.shape[2]
        if mask is not None:
            check_mask(mask, b=b, t=t, s=s)
        backend = self.backend
        if need_weights and not backend.supports_weights:
            warnings.warn(
                f"attention backend '{backend.name}' cannot return weights; using 'math' for this call",
                stacklevel=2,
            )
            backend = get_backend("math")
        k_all, v_all = kv.k, kv.v
        if self.n_kv_heads != self.n_heads:  # each key/value head serves a group of query heads
            group = self.n_heads // self.n_kv_heads
            k_all, v_all = k_all.repeat_interleave(group, dim=1), v_all.repeat_interleave(group, dim=1)
        out, weights = backend.fn(
            self.score.queries(q),
            k_all,
            v_all,
            mask,
            causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            scale=self.score.scale,
            **(self._options() if backend is self.backend else {}),
        )
        out = out.transpose(1, 2).reshape(b, t, self.d_model)  # (B, T, C)
        return AttentionOutput(self.out_proj(out), weights, kv)
