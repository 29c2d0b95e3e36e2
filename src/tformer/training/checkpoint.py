"""Checkpoints are directories: everything needed to predict, or to resume, and nothing that runs code.

    CHECKPOINT/
      config.json                 task, model and train config, tformer version
      model.safetensors           weights (tied weights stored once)
      *tokenizer.json             the task's tokenizer(s)
      trainer_state.json          optimiser, scheduler, step, epoch, batch position, RNG states, history:
      trainer_state.safetensors   ... the structure as JSON, every tensor and array in safetensors

Nothing here is unpickled: JSON and safetensors are data formats, so a crafted checkpoint cannot execute
code when it is read. A trainer state written by tformer 0.1 (`trainer_state.pt`, a pickle) is refused
for resuming with a message saying so; its weights are safetensors and still predict.

`write_checkpoint` writes a complete directory (every file and the directory fsynced); `save_checkpoint`
puts one at a path by writing a sibling temporary directory and renaming it into place. The run layout
(`checkpoint-<step>/` directories and the `checkpoint` link, retention, recovery) is in `run_dir.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

import tformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def crash_point(name: str) -> None:
    """Fault injection for the kill soak (benchmarks/kill_soak.py): `TFORMER_CRASH_AT=NAME[@N]` kills the
    process with SIGKILL the N-th time (default 1st) it passes the point `NAME`. A no-op otherwise."""
    want = os.environ.get("TFORMER_CRASH_AT")
    if not want:
        return
    point, _, nth = want.partition("@")
    if point != name:
        return
    seen = _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if seen == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: dict[str, int] = {}


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    config: Mapping[str, object],
    write_extra: Callable[[Path], None] | None = None,
    trainer_state: Mapping[str, object] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write every file of a checkpoint into the existing, empty `directory`, fsync them and it.

    `weights`: the model's full state dict when `model` itself holds only a shard (FSDP); tied names
    sharing one tensor are stored once, as for a module."""
    (directory / CONFIG).write_text(
        json.dumps({**config, "tformer_version": tformer.__version__}, indent=2), encoding="utf-8"
    )
    crash_point("write:config")
    save_model(model if weights is None else _StateDict(weights), str(directory / WEIGHTS))
    crash_point("write:weights")
    if write_extra is not None:
        write_extra(directory)
    if trainer_state is not None:
        write_state(directory, trainer_state)
        crash_point("write:state")
    for f in sorted(directory.iterdir()):  # file contents reach the disk before any rename shows them
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    crash_point("fsync:files")
    fsync_dir(directory)
    crash_point("fsync:dir")


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    config: Mapping[str, object],
    write_extra: Callable[[Path], None] | None = None,
    trainer_state: Mapping[str, object] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A stand-alone checkpoint directory at `path` (import, tests): written beside it, then renamed in.

    An existing tformer checkpoint at `path` is replaced; anything else there is refused."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not (path / CONFIG).exists()):
        raise CheckpointError(f"{path}: exists and is not a tformer checkpoint; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
    old = path.with_name(f".{path.name}.replaced")
    try:
        write_checkpoint(
            tmp,
            model=model,
            config=config,
            write_extra=write_extra,
            trainer_state=trainer_state,
            weights=weights,
        )
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as a weights file like model.safetensors (names sharing one tensor stored once)."""
    save_model(_StateDict(weights), str(path))


class _StateDict(torch.nn.Module):
    """Presents a ready state dict to safetensors' `save_model` (which drops duplicate tied names)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._state)


def _directory(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        hint = ""
        if path.is_symlink():
            hint = f" (a link to {os.readlink(path)}, which does not exist)"
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a directory (config.json + model.safetensors + ...)")
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint, as a mapping (anything else is a CheckpointError naming the file)."""
    cfg = _directory(path) / CONFIG
    if not cfg.exists():
        raise CheckpointError(f"{path}: not a tformer checkpoint ({CONFIG} is missing)")
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg}: corrupt config ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg}: a JSON {type(raw).__name__}; expected an object with the run's config")
    for section in ("model", "train", "data"):
        if section in raw and not isinstance(raw[section], dict):
            raise CheckpointError(
                f"{cfg}: '{section}' is a JSON {type(raw[section]).__name__}; expected an object"
            )
    return raw


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load model.safetensors into `model`, strictly: every tensor present and of the right shape.

    An adapter checkpoint (a LoRA run's: config.json has "lora") loads through training/lora.py: into a plain
    model its base with the adapters merged, into a resumed run's adapted model the adapters."""
    directory = _directory(path)
    if (directory / CONFIG).exists() and "lora" in (raw := read_config(directory)):
        from tformer.training.lora import load_adapter_checkpoint

        load_adapter_checkpoint(directory, model, raw["lora"])
        return
    weights = directory / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{Path(path)}: {WEIGHTS} is missing")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: corrupt weights file ({exc})") from None
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"{weights}: weights do not fit the model in config.json ({exc})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not match the model in config.json "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """model.safetensors as a state dict (tied names stored once), for loading into a sharded model."""
    weights = _directory(path) / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{Path(path)}: {WEIGHTS} is missing")
    try:
        return load_file(str(weights))
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: corrupt weights file ({exc})") from None


# --- trainer state: JSON structure + safetensors tensors ------------------------------------------------
# Encoded forms: {"__tensor__": key} a torch tensor, {"__ndarray__": key, "dtype": d} a NumPy array (stored
# as int64 / float64 tensors: safetensors has no uint32), {"__tuple__": [...]}, {"__items__": [[k, v]...]} a
# dict whose keys are not all plain strings. Other dicts, lists, str, int, float, bool, None are JSON.
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


def _encode(obj: object, tensors: dict[str, torch.Tensor], key: str) -> object:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "iufb":
            raise TypeError(f"trainer state: cannot store a NumPy array of dtype {obj.dtype} ({key})")
        wide = np.float64 if obj.dtype.kind == "f" else np.int64
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj, dtype=wide))
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{key}/k{i}"), _encode(v, tensors, f"{key}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}  # fmt: skip
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"trainer state: cannot store a {type(obj).__name__} ({key})")


def _decode(obj: object, tensors: dict[str, torch.Tensor], where: str) -> object:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    marker = [k for k in obj if k in _MARKERS]
    if not marker:
        bad = [k for k in obj if k.startswith("__")]
        if bad:
            raise CheckpointError(f"{where}: unknown entry {bad[0]!r}")
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    kind, value = marker[0], obj[marker[0]]
    if kind in ("__tensor__", "__ndarray__"):
        if not isinstance(value, str) or value not in tensors:
            raise CheckpointError(f"{where}: tensor {value!r} is missing from {STATE_TENSORS}")
        if kind == "__tensor__":
            return tensors[value]
        return tensors[value].numpy().astype(np.dtype(str(obj.get("dtype", "<i8"))))
    if not isinstance(value, list):
        raise CheckpointError(f"{where}: {kind} holds a {type(value).__name__}; expected a list")
    if kind == "__tuple__":
        return tuple(_decode(v, tensors, where) for v in value)
    if not all(isinstance(kv, list) and len(kv) == 2 for kv in value):
        raise CheckpointError(f"{where}: {kind} entries must be [key, value] pairs")
    return {_freeze(_decode(k, tensors, where)): _decode(v, tensors, where) for k, v in value}


def _freeze(key: object) -> object:
    return tuple(_freeze(k) for k in key) if isinstance(key, (list, tuple)) else key


def write_state(directory: Path, state: Mapping[str, object]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "state")
    seen: set[int] = set()
    for key, t in tensors.items():  # safetensors refuses tensors that share memory
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.numel() == 0:
            tensors[key] = t.clone()
        seen.add(ptr)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE).write_text(json.dumps(structure), encoding="utf-8")


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (JSON + safetensors: nothing is unpickled)."""
    directory = _directory(path)
    state, tensors_file = directory / STATE, directory / STATE_TENSORS
    if not state.exists():
        if (directory / LEGACY_STATE).exists():
            raise CheckpointError(
                f"{directory / LEGACY_STATE}: a trainer state from tformer 0.1, stored as a pickle, which can "
                "run code when it is loaded, so this version does not read it. The weights are safe: "
                "predict, eval, viz and export still work with this checkpoint. To train on, start a new "
                "run (--overwrite, or another --out), or finish this one with tformer 0.1"
            )
        raise CheckpointError(f"{directory}: {STATE} is missing; this checkpoint cannot be resumed")
    try:
        structure = json.loads(state.read_text(encoding="utf-8"))
        tensors = load_file(str(tensors_file)) if tensors_file.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"{state}: corrupt trainer state ({exc})") from None
    decoded = _decode(structure, tensors, str(state))
    if not isinstance(decoded, dict):
        raise CheckpointError(f"{state}: a JSON {type(decoded).__name__}; expected an object")
    return decoded


def require(state: Mapping[str, object], where: Path, *keys: str) -> None:
    """Refuse a trainer state that lacks an entry resuming needs, naming it."""
    for key in keys:
        if key not in state:
            raise CheckpointError(f"{where / STATE}: no '{key}' entry; the trainer state is incomplete")
