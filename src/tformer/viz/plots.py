"""PNG plots: an attention heatmap with token labels, and training / validation loss curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def attention_heatmap(
    weights: Any, src_tokens: Sequence[str], tgt_tokens: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """weights (T, S): row t is what target token t looked at. Written as a PNG at `path`."""
    w = np.asarray(weights, dtype=float)
    if w.shape != (len(tgt_tokens), len(src_tokens)):
        raise ValueError(f"weights have shape {w.shape}; expected (T={len(tgt_tokens)}, S={len(src_tokens)})")
    fig, ax = plt.subplots(figsize=(0.45 * len(src_tokens) + 2.5, 0.4 * len(tgt_tokens) + 2))
    im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(
        range(len(src_tokens)), [t.replace("\u2581", "") or "_" for t in src_tokens], rotation=60, ha="right"
    )
    ax.set_yticks(range(len(tgt_tokens)), [t.replace("\u2581", "") or "_" for t in tgt_tokens])
    ax.set_xlabel("source (keys)")
    ax.set_ylabel("target (queries)")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def loss_curve(history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "training") -> Path:
    """Train loss per logged step and validation NLL per evaluation, against optimiser steps."""
    train = [(r["step"], r["loss"]) for r in history if r.get("type") == "train"]
    valid = [(r["step"], r["valid_nll"]) for r in history if r.get("type") == "eval" and "valid_nll" in r]
    if not train and not valid:
        raise ValueError("no training or evaluation records to plot")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation NLL", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token or example)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)
