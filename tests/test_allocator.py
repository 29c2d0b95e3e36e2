"""tformer.allocator: with reuse on, big tensors come from glibc's heap and reuse freed memory without
page faults; with TFORMER_MALLOC=system they are mmap-ed as glibc does by default.

Each case runs in a fresh interpreter: mallopt settings are process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

PROBE = r"""
import ctypes, json, resource, sys
import torch
from tformer.allocator import reuse_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = reuse_freed_memory()
n = 64 * 2**20 // 4                        # a 64 MiB float32 tensor: above glibc's largest mmap threshold
before = libc.mallinfo2().hblkhd           # bytes in blocks glibc serves with mmap (some from imports)
a = torch.zeros(n)
mapped = libc.mallinfo2().hblkhd - before  # ... of which the new tensor's
del a


def step():                                # what a training step does: make big tensors, free them
    x = torch.zeros(n)
    y = torch.ones(n // 2)
    del x
    z = torch.full((n // 3,), 2.0)
    del y, z


for _ in range(10):                        # the heap grows to what the pattern needs ...
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):                         # ... and from then on serves it from memory already touched
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
json.dump({"applied": applied, "mapped": mapped, "faults": faults, "again": reuse_freed_memory()}, sys.stdout)
"""


def _probe(setting: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "TFORMER_MALLOC"}
    if setting is not None:
        env["TFORMER_MALLOC"] = setting
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's; elsewhere reuse_freed_memory() returns False")
def test_reuse_serves_big_tensors_from_the_heap_without_page_faults() -> None:
    r = _probe(None)
    assert r["applied"] is True and r["again"] is True
    assert r["mapped"] == 0  # the 64 MiB block came from the heap, not from its own mmap
    # three steps touch 3 x 28672 pages of 4 KiB; with the memory reused, (almost) none are new
    assert isinstance(r["faults"], int) and r["faults"] < 200


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's; elsewhere reuse_freed_memory() returns False")
def test_system_setting_leaves_glibc_as_it_is() -> None:
    r = _probe("system")
    assert r["applied"] is False
    assert isinstance(r["mapped"], int) and r["mapped"] >= 64 * 2**20  # glibc's default: its own mapping


def test_unknown_setting_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import tformer.allocator as allocator

    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("TFORMER_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match=r"TFORMER_MALLOC='jemalloc'.*'reuse'.*'system'"):
        allocator.reuse_freed_memory()
