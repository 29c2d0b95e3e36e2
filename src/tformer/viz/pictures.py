"""Two pictures the Transformer literature draws, computed from tformer's own definitions.

- The sinusoidal positional encoding (paper section 3.5): the positions x dimensions matrix, and a few
  dimensions as curves over position, their wavelengths growing geometrically from 2 pi to 10000 * 2 pi.
- Why dot products are scaled by 1/sqrt(d_k) (paper section 3.2.1, footnote 4): for random q, k with unit
  variance components, q . k has variance d_k, so without the scale the softmax saturates as d_k grows
  (one key takes nearly all the weight, the entropy falls, the softmax's Jacobian and so the gradient
  reaching the scores vanishes); with it the distribution stays the same at every d_k.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tformer.viz.plots import plt, save_figure  # plots selects matplotlib's file-only Agg backend

D_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def positional_encoding_png(
    path: str | Path, *, positions: int = 100, d_model: int = 512, curves: Sequence[int] | None = None
) -> Path:
    """Heatmap of PE (positions x d_model) from `tformer.positions.sinusoidal_table`, and curves of a few
    dimensions against position (default: sine dimensions 0, d/16, d/8, d/4 and d/2 - their wavelengths
    spread from 2 pi to about 2 pi * 10000^(1/2))."""
    from tformer.positions import sinusoidal_table

    if positions < 2 or d_model < 2 or d_model % 2:
        raise ValueError(f"need positions >= 2 and an even d_model >= 2; got {positions} and {d_model}")
    table = sinusoidal_table(positions, d_model).double().numpy()  # (positions, d_model)
    dims = (
        sorted({2 * (d_model // k // 2) for k in (d_model, 16, 8, 4, 2)}) if curves is None else list(curves)
    )
    bad = [d for d in dims if not 0 <= d < d_model]
    if bad:
        raise ValueError(f"curve dimensions {bad} are outside [0, {d_model})")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), height_ratios=(3, 2))
    # The paper interleaves sin (even i) and cos (odd i); drawn interleaved, neighbouring columns alternate
    # and the picture is stripes. Sines on the left, cosines on the right show each as one smooth wedge.
    half = d_model // 2
    shown = np.concatenate([table[:, 0::2], table[:, 1::2]], axis=1)
    im = top.imshow(shown, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    top.axvline(half - 0.5, color="black", lw=1)
    left, right = [0, half // 2], [0, half // 2, half - 1]  # column -> dimension 2c (sin) or 2c + 1 (cos)
    top.set_xticks(
        [*left, *(half + c for c in right)], [*(str(2 * c) for c in left), *(str(2 * c + 1) for c in right)]
    )
    top.set_xlabel("dimension i: the sines (even i) on the left, the cosines (odd i) on the right")
    top.set_ylabel("position")
    top.set_title(f"sinusoidal positional encoding, {positions} positions x d_model = {d_model}")
    fig.colorbar(im, ax=top, fraction=0.03, pad=0.02)
    for d in dims:
        wavelength = 2 * np.pi * 10000 ** ((d - d % 2) / d_model)
        bottom.plot(
            table[:, d], label=f"dim {d} ({'sin' if d % 2 == 0 else 'cos'}, wavelength {wavelength:.3g})"
        )
    bottom.set_xlabel("position")
    bottom.set_ylabel("PE[position, dim]")
    bottom.set_xlim(0, positions - 1)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path, dpi=110)


def softmax_saturation(
    d_ks: Sequence[int] = D_KS, *, n_keys: int = 16, samples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """For each d_k: draw `samples` queries and `n_keys` keys per query with N(0, 1) components (float64),
    score z = q . k, and summarise softmax(z / sqrt(d_k)) ("scaled") and softmax(z) ("unscaled").

    Returns lists aligned with `d_k`: the standard deviation of the scores, the mean largest probability,
    the mean entropy (nats; uniform = log n_keys) and the mean Frobenius norm of the softmax's Jacobian
    diag(p) - p p^T, which multiplies every gradient reaching the scores.
    """
    if n_keys < 2 or samples < 1 or not d_ks or min(d_ks) < 1:
        raise ValueError(
            f"need n_keys >= 2, samples >= 1 and d_k >= 1; got {n_keys}, {samples}, {list(d_ks)}"
        )
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"d_k": [int(d) for d in d_ks], "n_keys": n_keys, "samples": samples, "seed": seed}
    for name in ("scaled", "unscaled"):
        for stat in ("score_std", "max_prob", "entropy", "jacobian_norm"):
            out[f"{stat}_{name}"] = []
    for d in d_ks:
        q = rng.standard_normal((samples, 1, d))
        k = rng.standard_normal((samples, n_keys, d))
        z = (q * k).sum(-1)  # (samples, n_keys) dot products, variance d
        for name, scores in (("scaled", z / np.sqrt(d)), ("unscaled", z)):
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[f"score_std_{name}"].append(float(scores.std()))
            out[f"max_prob_{name}"].append(float(p.max(-1).mean()))
            out[f"entropy_{name}"].append(float(-(p * np.log(np.where(p > 0, p, 1.0))).sum(-1).mean()))
            out[f"jacobian_norm_{name}"].append(float(softmax_jacobian_norm(p).mean()))
    return out


def softmax_jacobian_norm(p: np.ndarray) -> np.ndarray:
    """Frobenius norm of d softmax / d scores = diag(p) - p p^T for probabilities p (..., n), in closed form:
    ||J||_F^2 = sum_i p_i^2 - 2 sum_i p_i^3 + (sum_i p_i^2)^2 (no n x n matrix is formed)."""
    s2, s3 = (p**2).sum(-1), (p**3).sum(-1)
    return np.sqrt(np.maximum(s2 - 2 * s3 + s2**2, 0.0))


def softmax_scale_png(path: str | Path, numbers: dict[str, Any] | None = None) -> Path:
    """Four panels against d_k (log scale), scaled vs unscaled: score spread, largest probability, entropy,
    Jacobian norm. `numbers` from `softmax_saturation` (computed with its defaults when None)."""
    n = softmax_saturation() if numbers is None else numbers
    d = n["d_k"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    panels = [
        ("score_std", "std of the scores", "log"),
        ("max_prob", "mean largest softmax probability", "linear"),
        ("entropy", "mean entropy of the softmax (nats)", "linear"),
        ("jacobian_norm", "mean ||d softmax / d scores||_F", "log"),
    ]
    for ax, (stat, label, yscale) in zip(axes.flat, panels, strict=True):
        ax.plot(d, n[f"{stat}_unscaled"], "o-", color="tab:red", label="softmax(q.k)")
        ax.plot(d, n[f"{stat}_scaled"], "o-", color="tab:blue", label="softmax(q.k / sqrt(d_k))")
        ax.set_xscale("log", base=2)
        ax.set_yscale(yscale)
        ax.set_xlabel("d_k")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[1, 0].axhline(np.log(n["n_keys"]), color="gray", ls="--", lw=1, label=f"uniform: log {n['n_keys']}")
    axes[0, 1].axhline(1 / n["n_keys"], color="gray", ls="--", lw=1, label=f"uniform: 1/{n['n_keys']}")
    for ax in axes.flat:
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Scaled dot-product attention: random q, k ~ N(0, I), {n['n_keys']} keys, {n['samples']} queries per d_k"
    )
    return save_figure(fig, path, dpi=110)


def write_json(numbers: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(numbers, indent=1))
    return path
