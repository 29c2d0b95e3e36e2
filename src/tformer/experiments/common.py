"""What every experiment shares: its result (numbers, tables, plots, notes), writing result.json and
summary.md, plots, and the data switch (a corpus under $TFORMER_DATA when present, generated data
otherwise, said in the output). Training is training.py's (through the Trainer); timing is
`tformer.bench.common.median_seconds`."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

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
    rows: Sequence[Sequence[object]]

    def markdown(self) -> str:
        def cell(v: object) -> str:
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
    numbers: dict[str, object] = field(default_factory=dict)  # JSON values
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # file names inside the output directory
    notes: list[str] = field(default_factory=list)  # data used, settings, caveats
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
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


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _PanelSeries(TypedDict):
    series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]]  # label -> (xs, ys)


class Panel(_PanelSeries, total=False):
    """One plot of `line_plot`: its curves, axis labels and scales, title, a horizontal reference line."""

    xlabel: str
    ylabel: str
    logx: bool
    logy: bool
    title: str
    hline: tuple[float, str]  # (y, label)


def line_plot(
    path: Path,
    panels: Sequence[Panel],
    *,
    title: str = "",
) -> str:
    """Panels side by side. Returns the file name."""
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
