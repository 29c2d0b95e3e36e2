"""The process's resident memory, now and at its peak, for benchmark reports and the training log ("memory is part of
speed": a setting that makes steps faster by keeping freed memory must show what it keeps)."""

from __future__ import annotations

import os
import sys


def peak_rss_bytes() -> int | None:
    """The most resident memory this process has had, in bytes (None where the OS does not say).

    Linux: VmHWM from /proc/self/status, this program's own high-water mark (getrusage's ru_maxrss
    carries the forking parent's peak over an exec, so a small child of a big process reports the
    parent's). Elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


def current_rss_bytes() -> int | None:
    """The process's resident set size now (VmRSS), in bytes; None where unknown (no /proc)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:  # pages; cheaper than /proc/self/status
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def format_bytes(n: float) -> str:
    """Decimal units, three significant figures at most: 950 B, 12.3 MB, 7.5 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"
