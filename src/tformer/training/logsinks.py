"""Where a training run's records go besides log.jsonl (`train.log`), and how progress shows where it writes.

log.jsonl is always written: it is the run's record (a resumed run rewrites it from the checkpoint's
history, `tformer plot` draws it). `train.log = ["jsonl", "tensorboard"]` also writes TensorBoard event
files under RUN_DIR/tensorboard through `torch.utils.tensorboard` (the `tensorboard` package): every train
record's loss, learning rate, tokens/s, gradient norm and peak memory, every evaluation metric, and at
each evaluation the attention heatmap of one fixed validation example where the task can draw one. A
resumed run purges the events after its checkpoint's step, as log.jsonl drops those records.

Progress: on a terminal a tqdm bar redrawn in place; where stderr is a file or a pipe (CI, `nohup`, a job
scheduler) one plain line every `LINE_EVERY_S` seconds instead of a carriage return per redraw.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from tformer.training.state import LogRecord

SINKS = ("jsonl", "tensorboard")
LINE_EVERY_S = 10.0  # a progress line at most this often where stderr is not a terminal
TRAIN_SCALARS = {  # train record field -> TensorBoard tag
    "loss": "train/loss",
    "lr": "train/lr",
    "tokens_per_s": "train/tokens_per_s",
    "grad_norm": "train/grad_norm",
    "peak_rss_bytes": "train/peak_rss_bytes",
    "nonfinite_skips": "train/nonfinite_skips",
}
NOT_METRICS = ("type", "step", "epoch")


class TensorBoardLog:
    """The run's TensorBoard event files, opened on first use (the `tensorboard` package is imported then,
    so a run without it never needs it); `purge_step`: events from that step on are dropped (a resume)."""

    def __init__(self, directory: Path, purge_step: int | None = None) -> None:
        self.directory, self.purge_step = directory, purge_step
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # torch's module imports the tensorboard package
                raise ImportError(
                    "train.log includes 'tensorboard', which needs the tensorboard package: "
                    "pip install tensorboard (or pip install -e .[tensorboard])"
                ) from exc
            self._writer = SummaryWriter(str(self.directory), purge_step=self.purge_step)
        return self._writer

    def record(self, record: LogRecord) -> None:
        """A train record's scalars under train/, an evaluation's numbers under eval/, at its step."""
        writer, step = self._open(), record["step"]
        if record.get("type") == "train":
            for key, tag in TRAIN_SCALARS.items():
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(tag, value, step)
        elif record.get("type") == "eval":  # not the run's other records (LoRA's parameter counts)
            for key, value in record.items():
                if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"eval/{key}", value, step)
        writer.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 picture at `step`."""
        self._open().add_image(tag, image, step, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Bar(Protocol):
    """What the training loop asks of its progress display (tqdm's names)."""

    def update(self, n: int = 1) -> object: ...
    def set_postfix(self, **values: str) -> None: ...
    def close(self) -> None: ...


class LineProgress:
    """A progress display for a log file: `desc step/total, the postfix` as one line, at most every
    `every` seconds (and once at the end when anything was shown), never a carriage return."""

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        desc: str = "",
        every: float = LINE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.total, self.n, self.desc, self.every, self.clock = total, initial, desc, every, clock
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.postfix: dict[str, str] = {}
        self._last = clock()
        self._shown_at: int | None = None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self._last >= self.every:
            self._show()

    def set_postfix(self, **values: str) -> None:
        self.postfix = dict(values)

    def _show(self) -> None:
        self._last = self.clock()
        self._shown_at = self.n
        extra = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        self.write(f"{self.desc}: step {self.n}/{self.total}" + (f", {extra}" if extra else ""))

    def close(self) -> None:
        if self._shown_at is not None and self._shown_at != self.n:
            self._show()


def training_bar(*, total: int, initial: int, desc: str, enabled: bool) -> Bar:
    """The loop's progress: a tqdm bar on a terminal, `LineProgress` where stderr is a file or a pipe,
    nothing when not `enabled` (another rank, --no-progress)."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial=initial, desc=desc)
    bar: Bar = tqdm(
        total=total, initial=initial, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True
    )
    return bar


def attention_picture(maps: Any) -> np.ndarray:
    """An AttentionMaps (tformer.viz.attention) -> its heatmap as an (H, W, 3) uint8 image: cross-attention
    where the model has it, else its first kind; the last layer, the mean of its heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = next((k for k in maps.kinds if k.name == "cross"), maps.kinds[0])
    weights = kind.layers[-1].mean(0)
    t, s = weights.shape
    fig, ax = plt.subplots(figsize=(min(12.0, 0.35 * s + 2.5), min(10.0, 0.3 * t + 2)))
    ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    every = max(1, s // 40)
    ax.set_xticks(range(0, s, every), kind.key_tokens[::every], rotation=90, fontsize=7)
    ax.set_yticks(range(0, t, max(1, t // 40)), kind.query_tokens[:: max(1, t // 40)], fontsize=7)
    ax.set_title(f"{kind.title}, last layer, mean of the heads", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from PIL import Image

    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy()
