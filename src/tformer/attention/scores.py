"""Score functions besides the scaled dot product, run through the unchanged exact kernels.

Which backends take them is declared in tformer/backends.py (`Backend.scores`). Every exact backend computes softmax(q k^T * scale) v. A score function is therefore expressed as a
transform of the queries and of the keys plus the `scale` handed to the kernel, so `math`, `sdpa`,
`chunked` and `local` (with its masks, causal fast paths and online softmax) need no change:

- "dot": the paper's q.k / sqrt(D) (section 3.2.1); q and k unchanged.
- "cosine": tau_h * cos(q, k), queries and keys L2-normalised, tau_h a learned temperature per head
  (query-key normalisation; Henry et al., 2020, "Query-Key Normalization for Transformers"; Swin
  Transformer v2, Liu et al., 2022). As in Swin v2, tau is stored as log(tau), initialised to log(10)
  and clamped at log(100): cosines lie in [-1, 1], so a temperature of 10 gives logits of the spread
  a dot product of unit-variance vectors has at d_head 64-100, and the clamp keeps the softmax from
  collapsing onto one key early in training. The temperature multiplies the (normalised) queries, so
  grouped-query heads can share their normalised keys.
- "l2": -||q - k||^2 / sqrt(D), the negative squared Euclidean distance (Kim et al., 2021, "The Lipschitz
  constant of self-attention"). Expanded, -||q - k||^2 = 2 q.k - |k|^2 - |q|^2; the last term is the
  same for every key of a query row, so it cancels in the softmax and is dropped. The rest is one dot
  product of augmented vectors, q' = [2q, 1] and k' = [k, -|k|^2] (D + 1 components): q'.k' = 2 q.k -
  |k|^2. We chose augmentation over an additive per-key bias because the backend contract takes a
  boolean mask only (no float bias through `chunked` or `local`), while every kernel already accepts
  queries/keys whose width differs from the values'. The cost is one more component in the q.k product.

Keys are transformed once, when they are projected (before the KV cache stores them), so cached decoding
does not re-normalise the whole cache at every step: with "cosine" the cache holds unit keys, with "l2"
it holds the augmented (D + 1)-wide keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.backends import SCORES

COSINE_INIT_TEMPERATURE = 10.0
COSINE_MAX_TEMPERATURE = 100.0


class AttentionScore(nn.Module):
    """The query/key transforms and kernel scale of one score function (see the module docstring).

    `keys` maps projected keys (B, H_kv, S, D) to the keys the kernel sees (what the KV cache stores);
    `queries` maps (B, H, T, D) queries likewise; `scale` is passed to the kernel (None: 1/sqrt(D)).
    """

    def __init__(self, kind: str, n_heads: int, d_head: int) -> None:
        super().__init__()
        if kind not in SCORES:
            raise ValueError(f"unknown attention score {kind!r}; expected one of {', '.join(SCORES)}")
        self.kind, self.d_head = kind, d_head
        self.scale: float | None = {"dot": None, "cosine": 1.0, "l2": 1.0 / math.sqrt(d_head)}[kind]
        if kind == "cosine":
            # one log-temperature per query head; 1-D, so the optimiser treats it like a bias or a norm's
            # gain (no weight decay, which would pull the temperature towards 1)
            self.log_temperature = nn.Parameter(torch.full((n_heads,), math.log(COSINE_INIT_TEMPERATURE)))

    def temperature(self) -> Tensor:
        """(H, 1, 1) cosine temperatures, exp of the clamped log-parameter."""
        return self.log_temperature.clamp(max=math.log(COSINE_MAX_TEMPERATURE)).exp().view(-1, 1, 1)

    def keys(self, k: Tensor) -> Tensor:
        if self.kind == "cosine":
            return F.normalize(k, dim=-1)
        if self.kind == "l2":
            return torch.cat([k, -k.square().sum(-1, keepdim=True)], dim=-1)  # (B, H_kv, S, D + 1)
        return k

    def queries(self, q: Tensor) -> Tensor:
        if self.kind == "cosine":
            return F.normalize(q, dim=-1) * self.temperature().to(q.dtype)
        if self.kind == "l2":
            return torch.cat([2.0 * q, torch.ones_like(q[..., :1])], dim=-1)  # (B, H, T, D + 1)
        return q

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
