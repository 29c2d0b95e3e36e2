"""`tformer experiment NAME`: the literature's claims about the Transformer, each measured by one module
that writes PNG plots, result.json and summary.md into an output directory; `all` runs every one and
builds one self-contained HTML report (report.py).

Sizes: "quick" (seconds, for the tests), "medium" (a few minutes), "full" (publishable curves, aimed at
most about 30 minutes each on 2 CPU cores).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tformer.experiments.common import Result

EXPERIMENTS = {
    "parallelism": "tformer.experiments.parallelism",
    "long-range": "tformer.experiments.long_range",
    "scaling": "tformer.experiments.scaling",
    "heads": "tformer.experiments.heads",
    "positions": "tformer.experiments.positions",
    "efficient": "tformer.experiments.efficient",
    "versus-rnn": "tformer.experiments.versus_rnn",
    "vision": "tformer.experiments.vision",
}


def run_experiment(name: str, out: str | Path, size: str = "full", threads: int | None = None) -> Result:
    """Run one experiment; its files go to `out` (result.json, summary.md, *.png).

    `threads`: torch's intra-op threads for the run (None: torch's default; "quick" defaults to 1, since
    two threads on a CPU shared with other work spin and ran 5x slower than one in our measurements)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} or 'all'")
    from tformer.experiments.common import SIZES

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    import torch

    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    if threads is None and size == "quick":
        threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        result: Result = importlib.import_module(EXPERIMENTS[name]).run(out, size)
    finally:
        torch.set_num_threads(before)
    result.seconds = time.perf_counter() - start
    result.notes.append(f"torch threads: {threads or before}.")
    result.write(out)
    return result


def run_all(
    out: str | Path, size: str = "full", names: list[str] | None = None, threads: int | None = None
) -> Path:
    """Every experiment (or `names`) into out/NAME/, then out/report.html with all plots and numbers."""
    from tformer.experiments.report import write_report

    out = Path(out)
    results = [run_experiment(name, out / name, size, threads) for name in (names or list(EXPERIMENTS))]
    return write_report(out, results)


__all__ = ["EXPERIMENTS", "run_all", "run_experiment"]
