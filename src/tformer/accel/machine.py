"""The machine a tuning is valid on: `fingerprint()` (CPU model, the ISA flags that decide which kernels
are fast, core and thread counts, the PyTorch build, the GPU), the cache directory, `TFORMER_ACCEL` and the
row-count buckets of shape classes. accel/tune.py keeps one cache file per fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import TypedDict

import torch

MODES = ("off", "auto")

# The /proc/cpuinfo flags that decide which kernels are fast: x86 vector/matrix units, ARM's features.
_ISA_FLAGS = frozenset(
    {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}
    | {"avx_vnni", "asimd", "sve", "bf16", "i8mm"}
)


class CudaDevice(TypedDict):
    name: str
    capability: list[int]  # [major, minor]


class Fingerprint(TypedDict):
    """What makes a timing valid on this machine, as JSON: a cached timing is reused only where all of it
    matches."""

    cpu: str
    isa: list[str]  # the `_ISA_FLAGS` this CPU has, sorted
    cpu_count: int | None
    threads: int  # torch's intra-op threads
    torch: str
    cuda: CudaDevice | None


def mode() -> str:
    """`TFORMER_ACCEL`: "auto" (the default) times candidates; "off" always takes the stock kernel."""
    value = os.environ.get("TFORMER_ACCEL", "auto")
    if value not in MODES:
        raise ValueError(f"TFORMER_ACCEL={value!r}: expected 'auto' (the default) or 'off'")
    return value


def rows_bucket(rows: int) -> str:
    """The shape class of a product's row count (batch x tokens): "1" (one-row decoding), "2-16", ">16"."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows={rows!r}: expected a positive int")
    return "1" if rows == 1 else "2-16" if rows <= 16 else ">16"


def _parse_cpuinfo(text: str) -> tuple[str | None, list[str]]:
    """-> (CPU model name or None, the sorted `_ISA_FLAGS` it has) from /proc/cpuinfo's text."""
    name: str | None = None
    flags: set[str] = set()
    arm: dict[str, str] = {}
    for line in text.splitlines():
        field, sep, value = line.partition(":")
        if not sep:
            continue
        field, value = field.strip().lower(), value.strip()
        if field == "model name" and name is None:
            name = value
        elif field in ("flags", "features") and not flags:  # x86 says flags, ARM says Features
            flags = set(value.split())
        elif field in ("cpu implementer", "cpu part") and field not in arm:
            arm[field] = value
    if name is None and len(arm) == 2:  # ARM Linux names no model: implementer and part tell cores apart
        name = f"{platform.machine()} implementer {arm['cpu implementer']} part {arm['cpu part']}"
    return name, sorted(flags & _ISA_FLAGS)


def fingerprint() -> Fingerprint:
    """This machine's `Fingerprint` (JSON-able)."""
    try:
        name, isa = _parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:  # not Linux
        name, isa = None, []
    cuda: CudaDevice | None = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        cuda = {"name": torch.cuda.get_device_name(), "capability": [major, minor]}
    return {
        "cpu": name or platform.processor() or platform.machine() or "unknown",
        "isa": isa,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "cuda": cuda,
    }


def fingerprint_key(fp: Fingerprint | None = None) -> str:
    """A short stable hex hash of `fp` (default: this machine's `fingerprint()`), for the cache file's name."""
    blob = json.dumps(fingerprint() if fp is None else fp, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


DEFAULT_LLC_BYTES = 32 * 2**20  # where the OS does not say: a common server part's last-level cache


def last_level_cache_bytes(base: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The size of this CPU's last-level cache (Linux sysfs: the highest cache level cpu0 reports), or
    `DEFAULT_LLC_BYTES` where it cannot be read."""
    best_level, best = -1, 0
    try:
        for index in base.glob("index*"):
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * scale
            if level > best_level or (level == best_level and size > best):
                best_level, best = level, size
    except (OSError, ValueError):
        return DEFAULT_LLC_BYTES
    return best if best > 0 else DEFAULT_LLC_BYTES


def cache_dir() -> Path:
    """$TFORMER_CACHE_DIR, else $XDG_CACHE_HOME/tformer, else ~/.cache/tformer; made on first write only."""
    explicit = os.environ.get("TFORMER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative path is invalid and ignored
        return Path(xdg) / "tformer"
    return Path.home() / ".cache" / "tformer"
