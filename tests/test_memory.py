"""tformer.memory: the peak resident size grows with memory touched; sizes print in decimal units."""

import json
import subprocess
import sys

import pytest

from tformer.memory import format_bytes, peak_rss_bytes

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
