"""PNG plots: attention heatmaps with token labels (one map, or every head of a layer), loss curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120, tight: bool = True) -> Path:
    """Write `fig` as a PNG (parent folders made) and close it."""
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
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
    return save_figure(fig, path)


def attention_grid(
    weights: Any,
    key_tokens: Sequence[str],
    query_tokens: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "key",
    ylabel: str = "query",
) -> Path:
    """weights (H, T, S): one panel per head, on one colour scale (0 to 1), tokens on both axes."""
    w = np.asarray(weights, dtype=float)
    t, s = len(query_tokens), len(key_tokens)
    if w.ndim != 3 or w.shape[1:] != (t, s):
        raise ValueError(f"weights have shape {w.shape}; expected (H, T={t}, S={s})")
    h = w.shape[0]
    cols = min(h, 4)
    rows = -(-h // cols)
    # inches per token: 0.28 for short inputs, shrinking so the figure stays within about 16 x 14 inches
    cell = max(0.02, min(0.28, (16 - 1.0 * cols) / (cols * s), (14 - 0.9 * rows) / (rows * t)))
    panel_w, panel_h = max(2.2, cell * s + 1.0), max(2.0, cell * t + 0.9)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(panel_w * cols + 1.2, panel_h * rows + 0.8),
        squeeze=False,
        constrained_layout=True,
    )
    every = max(1, math.ceil(0.11 / cell))  # label every n-th token where 7-point labels would overlap
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= h:
            ax.set_visible(False)
            continue
        im = ax.imshow(w[i], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_title(f"head {i + 1}", fontsize=9)
        ax.set_xticks(range(0, s, every), list(key_tokens)[::every], rotation=90, fontsize=7)
        ax.set_yticks(range(0, t, every), list(query_tokens)[::every], fontsize=7)
        if i % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if i // cols == rows - 1 or i + cols >= h:
            ax.set_xlabel(xlabel, fontsize=8)
    assert im is not None  # h >= 1 panels were drawn
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="attention weight")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=110, tight=False)  # constrained_layout already placed the panels


def loss_curve(history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "training") -> Path:
    """Train loss per logged step and validation NLL per evaluation, against optimiser steps."""
    train = [(r["step"], r["loss"]) for r in history if r.get("type") == "train" and "loss" in r]
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
    return save_figure(fig, path)


# Panels of `run_curves`: (title, y label, log scale, the record fields drawn: (type, field, label))
CURVE_PANELS: list[tuple[str, str, bool, list[tuple[str, str, str]]]] = [
    ("loss", "nats", True, [("train", "loss", "train loss"), ("eval", "valid_nll", "validation NLL")]),
    ("learning rate", "lr", False, [("train", "lr", "learning rate")]),
    ("speed", "tokens / s", False, [("train", "tokens_per_s", "tokens / s")]),
    ("gradient norm", "norm", True, [("train", "grad_norm", "before clipping")]),
]
EVAL_SKIP = ("type", "step", "epoch", "time", "valid_nll", "valid_ppl", "eval_seconds")


def run_curves(history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "training") -> Path:
    """Every curve of a run's log records on one PNG against optimiser steps: loss and validation NLL,
    learning rate, tokens/s, gradient norm, and one panel per other evaluation metric (BLEU, accuracy, ...);
    panels without records are left out."""

    def series(kind: str, key: str) -> list[tuple[float, float]]:
        return [
            (r["step"], float(r[key]))
            for r in history
            if r.get("type") == kind
            and isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool)
        ]

    panels = [
        (name, ylabel, logy, [(label, pts) for kind, key, label in fields if (pts := series(kind, key))])
        for name, ylabel, logy, fields in CURVE_PANELS
    ]
    metrics = sorted(
        {k for r in history if r.get("type") == "eval" for k in r if k not in EVAL_SKIP and series("eval", k)}
    )
    panels += [(m, m, False, [(m, series("eval", m))]) for m in metrics]
    panels = [p for p in panels if p[3]]
    if not panels:
        raise ValueError("no training or evaluation records to plot")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, ylabel, logy, curves) in zip(axes.flat, panels, strict=False):
        for label, pts in curves:
            xs, ys = zip(*pts, strict=True)
            ax.plot(
                xs,
                ys,
                "o-" if label.startswith("validation") or name in metrics else "-",
                label=label,
                lw=1.2,
                ms=3,
            )
        if logy and all(y > 0 for _, pts in curves for _, y in pts):
            ax.set_yscale("log")
        ax.set(title=name, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)
