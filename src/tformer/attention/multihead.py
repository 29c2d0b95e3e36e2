"""Multi-head attention (paper section 3.2.2): projections, split/merge heads, a backend; the caches it
reads and writes are attention/kv_cache.py's."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from tformer.attention.backends import get_backend, load
from tformer.attention.kv_cache import KV, KVCache
from tformer.attention.masks import check_mask, combine, positions_mask
from tformer.attention.scores import AttentionScore
from tformer.backends import SCORES, unsupported
from tformer.positions import RotaryEmbedding


class AttentionOutput(NamedTuple):
    out: Tensor  # (B, T, C)
    weights: Tensor | None  # (B, H, T, S) when asked for
    kv: KV | KVCache | None  # the caller's cache: `past` itself when it is a KVCache, else the keys/values


class MultiHeadAttention(nn.Module):
    """Multi-head attention; every projection is an `nn.Linear` module call.

    Self-attention (`cross=False`) attends from x (B, T, C) to x itself. Its q, k, v projections are one
    (C + 2 C_kv, C) linear layer `in_proj` (rows: q, then k, then v), so it does one matrix product for all
    three, as torch.nn.MultiheadAttention does (packed, it decoded 10-57% faster than three products:
    benchmarks/projection_layout.py). Cross-attention (`cross=True`) attends from x to `memory` (B, S, C):
    queries and keys/values come from different inputs, so its projections are `q_proj` (C, C) and
    `kv_proj` (2 C_kv, C), the same rows as `in_proj` split where the inputs differ. A cross-attention
    layer loads a state dict saved by tformer <= 0.2, whose cross-attention kept one `in_proj`
    (`_load_from_state_dict`).

    Cached decoding passes `past`, either a `KVCache` (preallocated; this step's keys/values are written
    into it in place, and it is returned as `kv`) or the `KV` of earlier positions (returned extended by
    concatenation), or `static_kv` (cross-attention keys/values computed once per source by `project_kv`).
    `score` picks the score function ("dot", "cosine", "l2"; attention/scores.py). What `backend` can do
    (scores, dropout, cross-attention, weights), which `backend_options` it takes and which parameters it
    owns (linformer's `proj_k` / `proj_v`, made by its factory) come from its entry in tformer/backends.py.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        backend: str = "sdpa",
        rotary: RotaryEmbedding | None = None,
        backend_options: Mapping[str, int] | None = None,
        n_kv_heads: int | None = None,
        score: str = "dot",
        cross: bool = False,
    ) -> None:
        super().__init__()
        self.backend = get_backend(backend)
        if score not in SCORES:
            raise ValueError(f"unknown attention score {score!r}; expected one of {', '.join(SCORES)}")
        problem = unsupported(self.backend.spec, score=score, dropout=dropout, cross=cross)
        if problem:
            raise ValueError(f"attention backend {backend!r} {problem}")
        self.cross = cross
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
        spec = self.backend.spec
        # only the options this backend takes (e.g. the window of "local"), by their user-facing names
        self.backend_options = {k: v for k, v in (backend_options or {}).items() if k in spec.options}
        self.score = AttentionScore(score, n_heads, self.d_head)
        packed = nn.Linear(d_model, d_model + 2 * self.kv_dim, bias=bias)  # rows: q, k, v
        if cross:  # the same rows (and the same random draws) as the packed layer, in two layers
            self.q_proj, self.kv_proj = _split_rows(packed, d_model)
        else:
            self.in_proj = packed
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # the parameters a backend owns (linformer's E and F), sized by its options, under their own names
        self.backend_params: tuple[str, ...] = ()
        if spec.params is not None:
            params = load(spec.params)(n_heads, self.d_head, **self.backend_options)
            for name, p in params.items():
                self.register_parameter(name, p)
            self.backend_params = tuple(params)

    def _options(self) -> Mapping[str, Tensor | int | None]:
        """The kernel's keywords: the backend's parameters when it owns some, else its options."""
        if self.backend_params:
            return {name: self._parameters[name] for name in self.backend_params}
        return self.backend_options

    def _split(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        return x.view(b, t, c // self.d_head, self.d_head).transpose(1, 2)  # (B, H or H_kv, T, D)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.out_proj.weight.dtype

    def in_projection(self) -> tuple[Tensor, Tensor | None]:
        """The in-projection as torch.nn.MultiheadAttention lays it out: weight (C + 2 C_kv, C) and bias,
        rows q, k, v (self-attention's own parameters; for cross-attention a concatenated copy)."""
        if not self.cross:
            return self.in_proj.weight, self.in_proj.bias
        q, kv = self.q_proj, self.kv_proj
        bias = None if q.bias is None or kv.bias is None else torch.cat([q.bias, kv.bias])
        return torch.cat([q.weight, kv.weight]), bias

    def project_kv(self, memory: Tensor) -> KV:
        """(B, S, C) -> keys and values (B, H, S, D); computed once per source for cross-attention."""
        if not self.cross:
            raise ValueError("project_kv is cross-attention's (a layer built with cross=True)")
        k, v = self.kv_proj(memory).chunk(2, dim=-1)  # (B, S, H_kv * D) each
        return KV(self.score.keys(self._split(k)), self._split(v))

    def _load_from_state_dict(
        self, state_dict: dict[str, Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        if self.cross:  # a cross-attention saved by tformer <= 0.2: one in_proj, rows q, k, v
            for name in ("weight", "bias"):
                old = state_dict.pop(f"{prefix}in_proj.{name}", None)
                if old is not None:
                    state_dict[f"{prefix}q_proj.{name}"] = old[: self.d_model]
                    state_dict[f"{prefix}kv_proj.{name}"] = old[self.d_model :]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        past: KV | KVCache | None = None,
        static_kv: KV | None = None,
        need_weights: bool = False,
    ) -> AttentionOutput:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"attention input has shape {tuple(x.shape)}; expected (B, T, C={self.d_model})")
        if x.dtype != self.weight_dtype:
            raise TypeError(f"attention input has dtype {x.dtype} but the weights are {self.weight_dtype}")
        b, t, c = x.shape
        if self.cross == (memory is None and static_kv is None):
            raise ValueError(
                "cross-attention (cross=True) needs `memory` or `static_kv`"
                if self.cross
                else "this is a self-attention layer: build MultiHeadAttention(..., cross=True) to attend to "
                "a `memory`"
            )
        # rows of a KVCache at different lengths (continuous batching): each row's own positions (B, T)
        rows = past.positions(t) if isinstance(past, KVCache) else None
        if not self.cross:
            # self-attention: one product for q, k and v
            y = self.in_proj(x)  # (B, T, C + 2 C_kv)
            qk_dim = self.d_model + self.kv_dim
            v = self._split(y[..., qk_dim:])
            if self.rotary is not None:
                offset = (0 if past is None else past.length) if rows is None else rows
                # the query and key heads rotated together, as the projection lays them out: one pass
                qk = self.rotary.rotate_heads(y[..., :qk_dim].view(b, t, -1, self.d_head), offset)
                q, k = (h.transpose(1, 2) for h in qk.split([self.n_heads, self.n_kv_heads], dim=2))
            else:
                q, k = self._split(y[..., : self.d_model]), self._split(y[..., self.d_model : qk_dim])
            kv = KV(self.score.keys(k), v)  # (B, H or H_kv, T, D) each
        else:
            q = self._split(self.q_proj(x))  # (B, H, T, D)
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
        cache: KV | KVCache = kv
        if isinstance(past, KVCache):
            kv = past.append(kv.k, kv.v)
            cache = past
        elif past is not None:
            kv = cache = KV(torch.cat([past.k, kv.k], dim=2), torch.cat([past.v, kv.v], dim=2))
        s = kv.k.shape[2]
        if mask is not None:
            check_mask(mask, b=b, t=t, s=s)
        if rows is not None:  # causal within each row: a query sees the slots up to its own position
            mask, causal = combine(mask, positions_mask(rows, s)), False
        backend = self.backend
        if need_weights and not backend.supports_weights:
            warnings.warn(
                f"attention backend '{backend.name}' cannot return weights; using 'math' for this call",
                stacklevel=2,
            )
            if backend.spec.reference_mask is not None:  # e.g. `local`'s window: the reference sees it too
                extra = load(backend.spec.reference_mask)(
                    t, s, causal=causal, device=x.device, **self.backend_options
                )
                mask = combine(mask, extra)
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
        return AttentionOutput(self.out_proj(out), weights, cache)


def legacy_cross_names(model: nn.Module) -> dict[str, tuple[str, str, int]]:
    """For every cross-attention layer of `model`: the parameter names tformer <= 0.2 gave its packed
    in-projection -> (the q_proj name, the kv_proj name, the number of q rows), to read states saved then
    (weights: `MultiHeadAttention._load_from_state_dict`; optimiser moments: training/distributed.py)."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MultiHeadAttention) and module.cross:
            p = f"{prefix}." if prefix else ""
            for name in ("weight", "bias"):
                out[f"{p}in_proj.{name}"] = (f"{p}q_proj.{name}", f"{p}kv_proj.{name}", module.d_model)
    return out


def split_legacy_rows(values: dict[str, Any], names: dict[str, tuple[str, str, int]]) -> dict[str, Any]:
    """`values` keyed by parameter name, with each legacy packed name of `names` replaced by its two parts
    (tensors of one row per output split by rows; a value without rows, such as an optimiser's step count,
    copied to both)."""

    def part(value: Any, rows: slice) -> Any:
        if isinstance(value, Tensor):  # a copy each, also of a 0-d step count (optimisers add to it in place)
            return (value[rows] if value.dim() > 0 else value).clone()
        if isinstance(value, dict):
            return {k: part(v, rows) for k, v in value.items()}
        return value

    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in names:
            q, kv, n = names[key]
            out[q], out[kv] = part(value, slice(0, n)), part(value, slice(n, None))
        else:
            out[key] = value
    return out


def _split_rows(packed: nn.Linear, rows: int) -> tuple[nn.Linear, nn.Linear]:
    """`packed`'s first `rows` output rows and the rest, as two linear layers (copies of its values)."""
    first = torch.nn.utils.skip_init(nn.Linear, packed.in_features, rows, bias=packed.bias is not None)
    rest = torch.nn.utils.skip_init(
        nn.Linear, packed.in_features, packed.out_features - rows, bias=packed.bias is not None
    )
    with torch.no_grad():
        first.weight.copy_(packed.weight[:rows])
        rest.weight.copy_(packed.weight[rows:])
        if packed.bias is not None:
            first.bias.copy_(packed.bias[:rows])
            rest.bias.copy_(packed.bias[rows:])
    return first, rest
