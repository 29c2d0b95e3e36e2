"""tformer.memory: the peak resident size grows with memory touched, the current one is VmRSS; sizes print
in decimal units."""

import json
import subprocess
import sys

import pytest

from tformer import memory
from tformer.memory import current_rss_bytes, format_bytes, peak_rss_bytes

CHILD = """
import json, sys
from tformer.memory import peak_rss_bytes
before = peak_rss_bytes()
block = b"\x01" * 800_000_000  # 800 MB, every page written: past the import's own peak
after = peak_rss_bytes()
json.dump({"before": before, "after": after}, sys.stdout)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="no getrusage")
def test_peak_rss_grows_by_what_was_touched():
    """In a child process (the peak is its own, not its parent's: a big test process starts it)."""
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["after"] - got["before"] >= 500_000_000
    assert peak_rss_bytes() > 10_000_000  # this process: at least its interpreter and torch


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (950, "950 B"),
        (1_000, "1 kB"),
        (12_345_678, "12.3 MB"),
        (7.5e9, "7.5 GB"),
        (1.234e12, "1.23e+03 GB"),
    ],
)
def test_format_bytes_known_answers(n, text):
    assert format_bytes(n) == text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_current_rss_is_vmrss():
    with open("/proc/self/status", encoding="ascii") as fh:
        vmrss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
    rss = current_rss_bytes()
    assert rss is not None and abs(rss - vmrss) < 4_000_000  # two readings a moment apart, pages and kB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is KiB on Linux")
def test_peak_rss_falls_back_to_ru_maxrss_in_kib(monkeypatch):
    import builtins
    import resource

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert memory.peak_rss_bytes() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
