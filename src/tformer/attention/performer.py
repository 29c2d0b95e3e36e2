"""Performer attention: softmax attention approximated with positive orthogonal random features
(FAVOR+, Choromanski et al., 2021). Linear in sequence length.

exp(q.k / sqrt(D)) is estimated by phi(q).phi(k) with phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),
x' = x / D^(1/4), and W (m, D) Gaussian rows made block-orthogonal and rescaled to chi-distributed norms.
Then attention = phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1). The causal variant keeps running sums of
phi(k) v^T and phi(k) over positions (prefix sums), computed a chunk at a time: inside a chunk with a
small masked product, across chunks by carrying the sums.

The features are fixed per (D, m, seed) and device: the same module gives the same function every call.
Key features are shifted by a constant bound (no overflow, and no key can change another's weight); with
head dims far above 128 in float32 they can underflow, so keep d_head <= 128 or compute in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tformer.attention.masks import causal_mask, key_padding

_FEATURES: dict[tuple[int, int, int, str, torch.dtype], Tensor] = {}


def orthogonal_features(
    d: int, m: int, *, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """(m, D) random feature matrix: stacked orthogonal blocks, rows scaled to Gaussian-like norms."""
    key = (d, m, seed, str(device), dtype)
    if key not in _FEATURES:
        g = torch.Generator().manual_seed(seed)
        blocks = []
        for _ in range(-(-m // d)):
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            blocks.append(q.T)
        w = torch.cat(blocks)[:m]  # (m, D), orthonormal rows within each block
        norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
        _FEATURES[key] = (w * norms).to(device=device, dtype=dtype)
    return _FEATURES[key]


def _phi(x: Tensor, w: Tensor, *, is_query: bool) -> Tensor:
    """Positive random features of x (B, H, N, D) -> (B, H, N, m)."""
    d = x.shape[-1]
    x = x * d**-0.25
    proj = torch.matmul(x, w.t())  # (B, H, N, m)
    sq = (x * x).sum(-1, keepdim=True) / 2
    # Shifts cancel between numerator and denominator as long as they are shared: per query row for
    # queries; for keys one constant that depends on no key (so a masked or future key cannot change
    # anything): max_i |w_i|^2 / 2 bounds w.x - |x|^2/2, so no key feature overflows.
    shift = proj.amax(-1, keepdim=True) if is_query else (w * w).sum(-1).amax() / 2
    return torch.exp(proj - sq - shift) / math.sqrt(w.shape[0])


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    scale: float | None = None,
    n_features: int = 256,
    chunk: int = 128,
    seed: int = 0,
) -> tuple[Tensor, Tensor | None]:
    if need_weights:
        raise ValueError("the 'performer' backend never forms attention weights; use 'math' for them")
    if dropout_p > 0.0:
        raise ValueError(
            "the 'performer' backend does not support attention dropout; set attention_dropout = 0"
        )
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(
            "the 'performer' backend approximates softmax(q k / sqrt(D)) only; scale must be default"
        )
    b, h, t, d = q.shape
    s = k.shape[-2]
    w = orthogonal_features(d, n_features, seed=seed, device=q.device, dtype=q.dtype)
    qf = _phi(q, w, is_query=True)  # (B, H, T, m)
    kf = _phi(k, w, is_query=False)  # (B, H, S, m)
    keep = key_padding(mask, backend="performer")  # (B, 1, S, 1)
    if keep is not None:
        kf = kf * keep.to(kf.dtype)  # masked keys contribute nothing
    if not causal:
        kv = torch.matmul(kf.transpose(-2, -1), v)  # (B, H, m, D)
        num = torch.matmul(qf, kv)
        den = torch.matmul(qf, kf.sum(-2, keepdim=True).transpose(-2, -1))  # (B, H, T, 1)
        return num / den.clamp_min(1e-30), None
    if t != s:  # decoding with a cache: T (usually 1) new queries over all S keys, directly
        a = torch.matmul(qf, kf.transpose(-2, -1)) * causal_mask(t, s, device=q.device)  # (B, H, T, S)
        return torch.matmul(a, v) / a.sum(-1, keepdim=True).clamp_min(1e-30), None
    state = torch.zeros(b, h, n_features, d, dtype=q.dtype, device=q.device)  # running sum of phi(k) v^T
    norm = torch.zeros(b, h, 1, n_features, dtype=q.dtype, device=q.device)  # running sum of phi(k)
    outs = []
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        qc, kc, vc = qf[:, :, t0:t1], kf[:, :, t0:t1], v[:, :, t0:t1]
        local = torch.matmul(qc, kc.transpose(-2, -1)).tril()  # (B, H, c, c): keys up to each query
        num = torch.matmul(qc, state) + torch.matmul(local, vc)
        den = (qc * norm).sum(-1, keepdim=True) + local.sum(-1, keepdim=True)
        outs.append(num / den.clamp_min(1e-30))
        state = state + torch.matmul(kc.transpose(-2, -1), vc)
        norm = norm + kc.sum(-2, keepdim=True)
    return torch.cat(outs, dim=-2), None
