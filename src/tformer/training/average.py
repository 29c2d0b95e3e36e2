"""`tformer average`: the mean of several checkpoints' weights as one checkpoint (fairseq's
average_checkpoints): the run's last K (`train.keep_checkpoints` decides how many a run keeps) or
checkpoint directories named one by one, each tensor summed in float64 and divided by K, then cast back
to its dtype (K copies of one checkpoint average to it exactly); tensors that are not floating point
(batch-norm's num_batches_tracked) are the newest's. `ema`: their ema.safetensors (train.ema) instead,
so one checkpoint's moving average becomes a checkpoint of its own.

The result is for prediction and evaluation: config.json and the tokenizers and other files of the newest
checkpoint, model.safetensors the mean, averaged.json where it came from, and no trainer state. It is
written beside OUT and renamed into place (checkpoint.save_checkpoint).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tformer.training import run_dir
from tformer.training.checkpoint import (
    CONFIG,
    STATE,
    STATE_TENSORS,
    WEIGHTS,
    CheckpointError,
    read_config,
    save_checkpoint,
)
from tformer.training.ema import EMA_WEIGHTS

PROVENANCE = "averaged.json"
_NOT_COPIED = {CONFIG, WEIGHTS, EMA_WEIGHTS, STATE, STATE_TENSORS, PROVENANCE}


def last_checkpoints(run: str | Path, k: int) -> list[Path]:
    """The run directory's newest `k` checkpoints, oldest first; fewer than `k` is an error saying how
    many the run keeps."""
    run = Path(run)
    if k < 1:
        raise ValueError(f"--last {k}: expected at least 1 checkpoint to average")
    if not (run / run_dir.MARKER).exists():
        raise CheckpointError(f"{run}: not a run directory (no {run_dir.MARKER}); --last K takes one")
    found = run_dir.checkpoints(run)
    if len(found) < k:
        kept = read_config(found[-1]).get("train", {}).get("keep_checkpoints") if found else None
        keeps = f"; the run keeps train.keep_checkpoints = {kept}" if kept is not None else ""
        names = ", ".join(p.name for p in found) or "none"
        raise CheckpointError(
            f"{run}: {len(found)} checkpoint(s) ({names}), fewer than --last {k}{keeps}; average fewer, "
            "or train with a larger train.keep_checkpoints"
        )
    return found[-k:]


def _weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    file = path / name
    if not file.exists():
        why = " (trained without train.ema)" if name == EMA_WEIGHTS else ""
        raise CheckpointError(f"{path}: {name} is missing{why}")
    try:
        return load_file(str(file))
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: corrupt weights file ({exc})") from None


def _first_difference(a: dict[str, object], b: dict[str, object]) -> str | None:
    for key in sorted(set(a) | set(b)):
        if a.get(key, "(absent)") != b.get(key, "(absent)"):
            return f"model.{key} = {a.get(key, '(absent)')!r} vs {b.get(key, '(absent)')!r}"
    return None


def _check_alike(
    base: Path,
    cfg: dict[str, object],
    ws: dict[str, torch.Tensor],
    other: Path,
    ocfg: dict[str, object],
    ows: dict[str, torch.Tensor],
) -> None:
    """Refuse two checkpoints of different models, naming both and the first difference."""
    why = _first_difference(cfg.get("model", {}), ocfg.get("model", {}))  # type: ignore[arg-type]
    if why is None and cfg.get("task") != ocfg.get("task"):
        why = f"task {cfg.get('task')!r} vs {ocfg.get('task')!r}"
    if why is None:
        for key in sorted(set(ws) | set(ows)):
            if key not in ws or key not in ows:
                why = f"tensor {key} only in {base if key in ws else other}"
            elif ws[key].shape != ows[key].shape or ws[key].dtype != ows[key].dtype:
                why = (
                    f"tensor {key}: {tuple(ws[key].shape)} {ws[key].dtype} vs "
                    f"{tuple(ows[key].shape)} {ows[key].dtype}"
                )
            if why is not None:
                break
    if why is not None:
        raise CheckpointError(f"{base} and {other} are not the same model ({why}); refusing to average them")


def average_weights(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of same-keyed state dicts, each floating-point tensor summed in float64 and cast back to its
    dtype; the others are the last (newest) one's."""
    newest = states[-1]
    out: dict[str, torch.Tensor] = {}
    for key, last in newest.items():
        if not last.is_floating_point():
            out[key] = last.clone()
            continue
        total = torch.zeros(last.shape, dtype=torch.float64)
        for state in states:
            total += state[key].to(torch.float64)
        out[key] = (total / len(states)).to(last.dtype)
    return out


def average_checkpoints(
    paths: Sequence[str | Path], out: str | Path, *, ema: bool = False, overwrite: bool = False
) -> Path:
    """Average the checkpoints `paths` (oldest first: the last is the newest) into the checkpoint `out`.
    `ema`: their ema.safetensors; `overwrite`: replace a checkpoint already at `out`."""
    if not paths:
        raise ValueError("no checkpoints to average")
    sources = [run_dir.resolve(p) if Path(p).is_symlink() else Path(p) for p in paths]
    for p in sources:
        if not (p / CONFIG).exists() and (p / run_dir.MARKER).exists():
            raise CheckpointError(f"{p}: a run directory; average its newest checkpoints with --last K")
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out}: exists; give --overwrite to replace it, or another OUT")
        if any(out.resolve() == s.resolve() for s in sources):
            raise CheckpointError(f"{out}: is one of the checkpoints being averaged; write another OUT")
    configs = [read_config(p) for p in sources]
    name = EMA_WEIGHTS if ema else WEIGHTS
    states: list[dict[str, torch.Tensor]] = []
    for path, cfg in zip(sources, configs, strict=True):
        weights = _weights(path, name)
        if states:
            _check_alike(sources[0], configs[0], states[0], path, cfg, weights)
        states.append(weights)
    averaged = average_weights(states)
    newest = sources[-1]
    config = {k: v for k, v in configs[-1].items() if k != "tformer_version"}

    def files(directory: Path) -> None:
        copy_files(newest, directory)
        record = {"weights": "ema" if ema else "raw", "checkpoints": [str(p) for p in sources]}
        (directory / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    return save_checkpoint(out, model=torch.nn.Module(), weights=averaged, config=config, write_extra=files)


def copy_files(source: Path, directory: Path) -> None:
    """A checkpoint's files besides its config, weights and trainer state (tokenizers, labels) into
    `directory`: what a checkpoint made from it (an average, a merge) predicts with."""
    for f in sorted(source.iterdir()):
        if f.name not in _NOT_COPIED:
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, directory / f.name)
