"""The run directory (`tformer train --out OUT`, the demo's `runs/demo`) and how it survives crashes.

    OUT/
      .tformer-run.json                 which command wrote this directory, when, with which tformer
      .tformer-run.lock                 locked by the process training there (flock), if any
      log.jsonl                         one JSON record per training log and evaluation
      checkpoint-<step>/                complete checkpoints; the newest `train.keep_checkpoints` are kept
      checkpoint -> checkpoint-<step>   a link to the latest, switched by one rename
      best -> checkpoint-<step>         train.keep_best: the best evaluation's checkpoint, never deleted
                                        by retention; best.json says its metric, value and step

A save writes `.checkpoint-<step>.tmp-*/`, fsyncs its files and itself, renames it to
`checkpoint-<step>/` and fsyncs OUT; then it makes a new link and renames it over `checkpoint`, the one
atomic switch, and fsyncs OUT again; only then are old checkpoints deleted. A `checkpoint-<step>/` name is
therefore always a complete checkpoint, and `checkpoint` always points at one: a crash at any point of a
save leaves the previous checkpoint in force, or the new one. Readers (predict, eval, resume) resolve the
link once and read every file from the directory it names; they never rename or delete anything. A run
directory given to a predictor means its `best` checkpoint where one is kept, else the latest (and says
which); resume always takes the latest.

Only a run that owns OUT writes into it: the marker says which command did. A fresh run into a directory
another run wrote needs `--resume` or `--overwrite`; the demo may rerun into its own.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from safetensors import SafetensorError

import tformer
from tformer.training.checkpoint import (
    CONFIG,
    LEGACY_STATE,
    CheckpointError,
    crash_point,
    fsync_dir,
    load_trainer_state,
)

MARKER = ".tformer-run.json"
LOCK = ".tformer-run.lock"  # held by the training process (never deleted: a lock lives on its file)
LATEST = "checkpoint"
BEST = "best"
BEST_INFO = "best.json"
LOG = "log.jsonl"
_STEP = re.compile(r"checkpoint-(\d+)(?:-(\d+))?")
# train.keep_best = "ema_...": the best evaluation's moving average, a checkpoint of its own
_BEST_EMA = re.compile(r"best-ema-(\d+)")
# what a save, a log rewrite or the room check leaves behind when killed half-way
_TEMP = re.compile(
    r"\.checkpoint-\d+(?:-\d+)?\.(?:tmp|deleting)-.*|\.checkpoint\.link-tmp|\.tformer-write-test-.*"
    r"|\.log\.jsonl\.tmp|\.tformer-run\.json\.tmp|\.best\.link-tmp|\.best\.json\.tmp"
    r"|\.best-ema-\d+\.(?:tmp-.*|replaced)"
)


def read_marker(out_dir: Path) -> dict[str, object] | None:
    path = out_dir / MARKER
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt run marker ({exc}); expected a JSON object") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("command"), str):
        raise CheckpointError(f"{path}: not a tformer run marker (expected an object with a 'command')")
    return marker


def _entries(out_dir: Path) -> list[Path]:
    """What runs write into OUT (and only that: other files there are left alone)."""
    if not out_dir.is_dir():
        return []
    names = (LATEST, BEST, BEST_INFO, LOG, MARKER)
    return sorted(
        p
        for p in out_dir.iterdir()
        if p.name in names
        or _STEP.fullmatch(p.name)
        or _BEST_EMA.fullmatch(p.name)
        or _TEMP.fullmatch(p.name)
    )


def _remove(path: Path) -> None:
    """Delete a file, link or directory; a directory is first renamed to a temporary name, so a kill in the
    middle of deleting it never leaves a half-deleted `checkpoint-<step>/` that looks complete."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
        if _STEP.fullmatch(path.name):
            os.replace(path, doomed)
            path = doomed
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _legacy(out: Path) -> bool:
    """A tformer 0.1 run directory: `checkpoint/` a real directory with a pickled trainer state."""
    link = out / LATEST
    return not link.is_symlink() and (link / LEGACY_STATE).exists()


def claim(
    out_dir: str | Path, *, command: str, resume: bool, overwrite: bool = False, rerun: bool = False
) -> None:
    """Check that this run may write into `out_dir`, and mark it as this command's.

    `resume`: continue the run there (a directory another command wrote, or files no tformer run wrote,
    are refused). Fresh: an empty or new directory; a directory a run wrote needs `overwrite` (its
    checkpoints and log are deleted), unless `rerun` and the same command wrote it (the demo)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; --out names a directory")
    marker = read_marker(out)
    entries = [p for p in _entries(out) if p.name != MARKER]
    legacy = marker is None and _legacy(out)
    if resume and not overwrite:
        if marker is None and entries:
            if legacy:  # tformer 0.1 wrote no marker: say what its state is (load_trainer_state refuses it)
                load_trainer_state(out / LATEST)
            raise CheckpointError(
                f"{out}: holds files no tformer run marked as its own ({', '.join(p.name for p in entries)}; "
                f"no {MARKER}); refusing to resume into it"
            )
        if marker is not None and marker["command"] != command:
            raise CheckpointError(
                f"{out}: written by `{marker['command']}`, not `{command}`; refusing to resume it here"
            )
    elif entries:
        same = marker is not None and marker["command"] == command
        if not (overwrite or (rerun and (same or legacy))):  # the demo replaces its own, 0.1's included
            if legacy:
                raise CheckpointError(
                    f"{out}: holds a run of tformer 0.1 (checkpoint/ with {LEGACY_STATE}), which this version "
                    "cannot resume; choose another --out, or pass --overwrite to replace it"
                )
            if marker is None:
                raise CheckpointError(
                    f"{out}: holds files tformer did not write there ({', '.join(p.name for p in entries)}); "
                    "choose another --out, or pass --overwrite to delete them"
                )
            found = latest(out)
            at = f" (checkpoint {found.name})" if found is not None else ""
            way = (
                "continue it with --resume, or start again" if same else "choose another --out, or replace it"
            )
            raise CheckpointError(
                f"{out}: holds a run of `{marker['command']}`{at}; {way} with --overwrite (deletes its "
                "checkpoints and log.jsonl)"
            )
        for p in entries:
            _remove(p)
    out.mkdir(parents=True, exist_ok=True)
    if marker is None or marker["command"] != command or not resume:
        record = {
            "command": command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tformer_version": tformer.__version__,
        }
        _write_atomic(out / MARKER, json.dumps(record, indent=2) + "\n")


def lock(out_dir: str | Path) -> int | None:
    """Hold OUT for this process while it trains (an advisory `flock` on `.tformer-run.lock`, released when
    the process ends however it ends): a second run into the same directory at the same time is refused,
    e.g. a requeued job starting while the old one still handles its SIGTERM. -> the descriptor to pass
    to `unlock` (None where the system has no flock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CheckpointError(
            f"{out}: another tformer process (pid {holder}) is training there now; wait for it to stop, "
            "or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoint directories of a run, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _STEP.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and (p / CONFIG).exists():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def latest(out_dir: str | Path) -> Path | None:
    """The directory the run's `checkpoint` link names (resolved, so every file comes from one save); the
    newest complete checkpoint if the link is missing or dangling; a tformer 0.1 `checkpoint/` directory
    as it is; None before the first save."""
    link = Path(out_dir) / LATEST
    if link.is_symlink():
        target = link.resolve()
        if target.is_dir():
            return target
    elif link.is_dir():
        return link
    found = checkpoints(out_dir)
    return found[-1] if found else None


def best(out_dir: str | Path) -> Path | None:
    """The checkpoint the run's `best` link names (resolved), or None where the run keeps none."""
    link = Path(out_dir) / BEST
    if link.is_symlink() and link.resolve().is_dir() and (link.resolve() / CONFIG).exists():
        return link.resolve()
    return None


def best_info(out_dir: str | Path) -> dict[str, object] | None:
    """best.json: {"metric", "value", "step", "checkpoint"} of the kept best, or None."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((Path(out_dir) / BEST_INFO).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    return None


def mark_best(out_dir: str | Path, checkpoint: Path, *, metric: str, value: float, step: int) -> None:
    """Point `best` at `checkpoint` (one rename, as for `checkpoint`) and record why in best.json."""
    out = Path(out_dir)
    info = {"metric": metric, "value": value, "step": step, "checkpoint": checkpoint.name}
    tmp_info = out / ".best.json.tmp"
    tmp_info.write_text(json.dumps(info) + "\n", encoding="utf-8")
    new_link = out / ".best.link-tmp"
    new_link.unlink(missing_ok=True)
    os.symlink(checkpoint.name, new_link)
    os.replace(new_link, out / BEST)
    os.replace(tmp_info, out / BEST_INFO)
    fsync_dir(out)


def best_ema_path(out_dir: str | Path, step: int) -> Path:
    """Where train.keep_best = "ema_..." writes the moving average of the best evaluation at `step`."""
    return Path(out_dir) / f"best-ema-{step}"


def prune_best_ema(out_dir: str | Path) -> None:
    """Delete the best-ema-<step> directories that `best` no longer names (an older best)."""
    out = Path(out_dir)
    link = out / BEST
    keep = link.resolve() if link.is_symlink() else None
    for p in out.iterdir():
        if _BEST_EMA.fullmatch(p.name) and p.is_dir() and p.resolve() != keep:
            _remove(p)


def resolve(path: str | Path, *, say: bool = False) -> Path:
    """A checkpoint path as readers use it: a link resolved once; a run directory -> its best checkpoint
    where the run keeps one (train.keep_best), else its latest; `say`: tell stderr which it took."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.is_dir() and not (path / CONFIG).exists() and (path / MARKER).exists():
        found, which = best(path), "best"
        if found is None:
            found, which = latest(path), "latest"
        if found is not None:
            if say:
                info = best_info(path) if which == "best" else None
                why = f" ({info['metric']} {info['value']:.4g} at step {info['step']})" if info else ""
                print(f"{path}: the {which} checkpoint{why}, {found.name}", file=sys.stderr)
            return found
    return path


def _disk_free(path: Path) -> str:
    with contextlib.suppress(OSError):
        return f"{shutil.disk_usage(path).free / 2**20:,.1f} MiB free there"
    return "free space unknown"


def check_room(out_dir: str | Path, needed: int) -> None:
    """Before step 1: OUT is writable and has room for one more checkpoint of about `needed` bytes."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tformer-write-test-") as fh:
            link = out / f"{Path(fh.name).name}.link"
            os.symlink(Path(fh.name).name, link)  # a save switches a link: the file system must have them
            os.replace(link, out / f"{link.name}2")
            (out / f"{link.name}2").unlink()
        fsync_dir(out)
    except OSError as exc:
        raise CheckpointError(
            f"{out}: cannot keep checkpoints there ({exc.strerror or exc}); a run directory needs a file "
            "system with symbolic links (Linux, macOS)"
        ) from None
    free = shutil.disk_usage(out).free
    if free < needed:
        raise CheckpointError(
            f"{out}: {free / 2**20:,.1f} MiB free, but a checkpoint of this run needs about "
            f"{needed / 2**20:,.1f} MiB; free some space or choose another --out"
        )


def save(out_dir: str | Path, *, step: int, keep: int, write: Callable[[Path], None]) -> Path:
    """Write `checkpoint-<step>/` (see the module doc) with `write(directory)` (checkpoint.write_checkpoint
    and its files), switch `checkpoint` to it, keep the newest `keep`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    link = out / LATEST
    if link.exists() and not link.is_symlink():
        raise CheckpointError(
            f"{link}: a directory, not the link this run layout keeps (an older tformer's checkpoint, or "
            "someone else's); move it away or choose another --out"
        )
    name, k = f"checkpoint-{step}", 0
    while (out / name).exists() or (out / name).is_symlink():
        k += 1
        name = f"checkpoint-{step}-{k}"
    final = out / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
        write(tmp)
        os.replace(tmp, final)
        crash_point("rename:checkpoint")
        fsync_dir(out)
        crash_point("fsync:out")
        new_link = out / ".checkpoint.link-tmp"
        new_link.unlink(missing_ok=True)
        os.symlink(name, new_link)
        crash_point("link:made")
        os.replace(new_link, link)
        crash_point("link:switched")
        fsync_dir(out)
        crash_point("fsync:link")
    except (OSError, RuntimeError, SafetensorError) as exc:  # a full disk, a file-size limit, ...
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and not (link.is_symlink() and link.resolve() == final.resolve()):
            _remove(final)
        raise CheckpointError(f"{final}: could not write the checkpoint ({exc}); {_disk_free(out)}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(out, keep)
    crash_point("pruned")
    return final


def prune(out_dir: Path, keep: int) -> None:
    """Delete checkpoints beyond the newest `keep` (never the ones `checkpoint` and `best` name) and the
    temporary directories of saves that died."""
    protected = set()
    for name in (LATEST, BEST):
        link = out_dir / name
        if link.is_symlink():
            protected.add(link.resolve())
    found = checkpoints(out_dir)
    for p in found[: max(0, len(found) - keep)]:
        if p.resolve() not in protected:
            _remove(p)
    for p in out_dir.iterdir():
        if _TEMP.fullmatch(p.name):
            _remove(p)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def log_records(out_dir: str | Path) -> Iterator[tuple[int, dict[str, object] | None, str]]:
    """(line number, record or None when the line is not a complete JSON object, raw line) of log.jsonl."""
    path = Path(out_dir) / LOG
    if not path.exists():
        return
    with path.open(encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            ok = line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("step"), int)
            yield n, record if ok else None, line


def rewrite_log(out_dir: str | Path, history: Sequence[Mapping[str, object]]) -> None:
    """On resume: log.jsonl becomes the records of the checkpoint's history (every log line and evaluation
    up to its step; later ones are logged again), so lines a crash cut short or never flushed come back.
    Lines of the old log that were cut short or unreadable are named in a warning."""
    path = Path(out_dir) / LOG
    bad = [n for n, record, _ in log_records(out_dir) if record is None]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        print(
            f"warning: {path}: {len(bad)} incomplete or unreadable line(s) (line {shown}), a crash in the "
            "middle of a write; the log is rewritten from the checkpoint's records",
            file=sys.stderr,
        )
    if path.exists() or history:
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in history))
