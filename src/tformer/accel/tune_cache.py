"""The tuner's cache file: one JSON file per machine `fingerprint()` (accel/machine.py),

    {"schema": 1, "fingerprint": {...}, "entries": {key: {"winner", "stock", "median_s", "noise",
    "excluded", "tformer", "time"}}}

(a ratio entry has "ratio" for "winner" and "stock"). A file of another schema or fingerprint is ignored, a
corrupt one ignored with a warning; either is replaced on the next write. Writes are atomic (temporary
file, fsync, `os.replace`) and merge, under an `flock` on a sibling lock file, with what other processes
wrote meanwhile. Nothing read back is executed: entries are JSON objects, checked by the Tuner where read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from tformer.accel.machine import Fingerprint
from tformer.jsontypes import JSON, JSONObject

SCHEMA = 1


class CacheFile:
    """The cache file at `path` for the machine `fingerprint` (as it reads back from JSON)."""

    def __init__(self, path: Path, fingerprint: Fingerprint) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self._warned_unreadable = False

    def read(self) -> dict[str, JSONObject]:
        """The file's entries for this schema and fingerprint; {} for a missing, foreign or unreadable file."""
        try:
            data: JSON = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8
            self._warn_unreadable(f"{type(exc).__name__}: {exc}")
            return {}
        if not isinstance(data, dict):
            self._warn_unreadable(f"a JSON {type(data).__name__}, not an object")
            return {}
        if data.get("schema") != SCHEMA:
            return {}  # another version's file: replaced on the next write
        entries = data.get("entries")
        if not isinstance(entries, dict) or not isinstance(data.get("fingerprint"), dict):
            self._warn_unreadable("no 'fingerprint' and 'entries' objects")
            return {}
        if data["fingerprint"] != self.fingerprint:
            return {}  # another machine's file: replaced on the next write
        return {skey: entry for skey, entry in entries.items() if isinstance(entry, dict)}

    def _warn_unreadable(self, why: str) -> None:
        if not self._warned_unreadable:
            self._warned_unreadable = True
            warnings.warn(
                f"tformer accel: ignoring the unreadable tuning cache {self.path} ({why}); it will be replaced",
                stacklevel=5,  # the caller of the Tuner's lookup/record/choose/ratio
            )

    def write(self, measured: Mapping[str, JSONObject]) -> dict[str, JSONObject]:
        """Write `measured` over what the file holds now (what other processes wrote meanwhile stays), under
        the lock, atomically; -> the entries written. Raises OSError where the file cannot be written."""
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock():
                entries = {**self.read(), **measured}
                data = {"schema": SCHEMA, "fingerprint": self.fingerprint, "entries": entries}
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                tmp = None
            return entries
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive flock on a sibling lock file across processes; none where flock is missing or fails."""
        if sys.platform == "win32":
            yield
            return
        import fcntl

        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):  # e.g. ENOLCK on some network file systems: merge unlocked
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
