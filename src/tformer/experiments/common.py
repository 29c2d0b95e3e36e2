"""What every experiment shares: its result (numbers, tables, plots, notes), writing result.json and
summary.md, plots, timing, a small training loop for the generated tasks, and the data switch (a corpus
under $TFORMER_DATA when present, generated data otherwise, said in the output)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

SIZES = ("quick", "medium", "full")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        def cell(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Result:
    """One experiment's outcome: the claim, what was run, the numbers, the tables and plots."""

    name: str
    claim: str
    size: str
    numbers: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # file names inside the output directory
    notes: list[str] = field(default_factory=list)  # data used, settings, caveats
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "claim": self.claim,
            "size": self.size,
            "seconds": self.seconds,
            "machine": machine(),
            "numbers": self.numbers,
            "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for t in self.tables],
            "plots": self.plots,
            "notes": self.notes,
        }

    def markdown(self) -> str:
        parts = [f"# Experiment `{self.name}` ({self.size})", "", f"Claim: {self.claim}", ""]
        parts += [f"- {n}" for n in self.notes]
        parts += ["", f"Machine: {machine()}; {self.seconds:.0f} s.", ""]
        for t in self.tables:
            parts += [t.markdown(), ""]
        parts += [f"![{p}]({p})" for p in self.plots]
        return "\n".join(parts) + "\n"

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        (out / "summary.md").write_text(self.markdown())


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def data_dir(name: str, *files: str) -> Path | None:
    """$TFORMER_DATA/<name> (default ../shared/data/<name>) when it holds `files`, else None."""
    root = Path(os.environ.get("TFORMER_DATA", "../shared/data")) / name
    return root if all((root / f).exists() for f in files) else None


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit(
    model: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    *,
    lr: float,
    warmup: int = 0,
    clip: float = 1.0,
    every: int = 0,
    evaluate: Callable[[], float] | None = None,
) -> list[tuple[int, float, float | None]]:
    """Adam with linear warm-up then cosine decay; `loss_fn(step)` builds a batch and returns its mean loss.

    Returns (step, training loss averaged since the last record, evaluate() or None) every `every` steps and
    at the end. The model gets tformer.accel's kernels (in place), as the command line's training does."""
    from tformer import accel

    accel.apply(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    history: list[tuple[int, float, float | None]] = []
    running: list[float] = []
    model.train()
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        running.append(loss.item())
        if (every and (step + 1) % every == 0) or step == steps - 1:
            value = None
            if evaluate is not None:
                model.eval()
                with torch.no_grad():
                    value = evaluate()
                model.train()
            history.append((step + 1, sum(running) / len(running), value))
            running = []
    model.eval()
    return history


def line_plot(
    path: Path,
    panels: Sequence[dict[str, Any]],
    *,
    title: str = "",
) -> str:
    """Panels side by side; each {"series": {label: (xs, ys)}, "xlabel", "ylabel", "logx", "logy", "title",
    "hline": (y, label)}. Returns the file name."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if "hline" in panel:
            y, label = panel["hline"]
            ax.axhline(y, color="grey", linestyle="--", linewidth=1, label=label)
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def char_corpus(size: str) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """Tiny Shakespeare as character ids (train 90% / valid 10%), or generated English number words when
    the corpus is absent. -> (train ids, valid ids, vocabulary size, description)."""
    root = data_dir("tinyshakespeare", "input.txt")
    if root is not None:
        text = (root / "input.txt").read_text()
        what = f"Tiny Shakespeare ({root / 'input.txt'}), characters, 90/10 split"
    else:
        from num2words import num2words

        g = torch.Generator().manual_seed(0)
        text = "\n".join(
            num2words(int(n))
            for n in torch.randint(0, 10**6, (4_000 if size == "quick" else 40_000,), generator=g)
        )
        what = "generated text (English number words; Tiny Shakespeare not found under $TFORMER_DATA)"
    chars = sorted(set(text))
    index = {ch: i for i, ch in enumerate(chars)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(chars), what


def lm_batch(
    ids: torch.Tensor, batch: int, block: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(len(ids) - block - 1, (batch,), generator=g)
    w = ids[starts[:, None] + torch.arange(block + 1)]
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def lm_valid_loss(
    model: nn.Module, ids: torch.Tensor, block: int, batches: int = 8, batch: int = 16
) -> float:
    """Mean next-token loss on `batches` fixed random windows of the validation ids (same for every model)."""
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(batches):
        x, y = lm_batch(ids, batch, block, g)
        logits = model(x).logits
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    return total / batches


def fit_char_lm(
    model: nn.Module,
    train_ids: torch.Tensor,
    valid_ids: torch.Tensor,
    settings: dict[str, Any],
    *,
    lr: float,
) -> list[tuple[int, float, float | None]]:
    """`fit` a character LM on windows of `train_ids` (settings: batch, block, steps, every), the same batch
    sequence for every model (seed 0), with the validation loss recorded every `every` steps."""
    g = torch.Generator().manual_seed(0)
    block = settings["block"]

    def loss_fn(step: int) -> torch.Tensor:
        x, y = lm_batch(train_ids, settings["batch"], block, g)
        logits = model(x).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return fit(
        model,
        loss_fn,
        settings["steps"],
        lr=lr,
        warmup=settings["steps"] // 10,
        every=settings["every"],
        evaluate=lambda: lm_valid_loss(model, valid_ids, block),
    )
