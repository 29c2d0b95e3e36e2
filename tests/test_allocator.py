"""tformer.allocator: under the default policy ("bounded") big tensors up to 256 MiB come from glibc's heap
and reuse freed memory without page faults, bigger ones are mmap-ed and handed back on free, and more than
1 GiB free at the heap's top goes back to the kernel; "keep" keeps everything; "system" leaves glibc as is.
Also the resident sizes (tformer.memory) as a step's memory moves.

Each malloc case runs in a fresh interpreter: mallopt settings are process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import tformer.allocator as allocator

glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(
    not glibc, reason="mallopt is glibc's; elsewhere reuse_freed_memory() is False"
)

PROBE = r"""
import ctypes, json, resource, sys
import torch
from tformer.allocator import reuse_freed_memory
from tformer.memory import current_rss_bytes

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

before = libc.mallinfo2().hblkhd           # a 320 MiB tensor: above the bounded policy's threshold
big = torch.ones(320 * 2**20 // 4)
big_mapped = libc.mallinfo2().hblkhd - before
rss = current_rss_bytes()
del big
json.dump({"applied": applied, "mapped": mapped, "faults": faults, "again": reuse_freed_memory(),
           "big_mapped": big_mapped, "big_unmapped": libc.mallinfo2().hblkhd - before,
           "big_rss_drop": rss - current_rss_bytes()}, sys.stdout)
"""

# 12 blocks of 100 MiB (below the 256 MiB threshold: from the heap) touched, then freed from the top down
TRIM_PROBE = r"""
import ctypes, json, sys
from tformer.allocator import reuse_freed_memory
from tformer.memory import current_rss_bytes

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = reuse_freed_memory()
size = 100 * 2**20
blocks = [libc.malloc(size) for _ in range(12)]
for b in blocks:
    ctypes.memset(b, 1, size)
rss = current_rss_bytes()
for b in reversed(blocks):
    libc.free(b)
json.dump({"applied": applied, "rss_drop": rss - current_rss_bytes()}, sys.stdout)
"""

# optimiser steps around a recurring pattern of freed blocks, then one step after the heap grew by 400 MiB
STEP_PROBE = r"""
import ctypes, json, resource, sys
import torch
import tformer.allocator as allocator
from tformer.allocator import reuse_freed_memory
from tformer.memory import current_rss_bytes

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = reuse_freed_memory()
if allocator._trimmer is not None:
    allocator._trimmer.slack = 200 * 2**20  # instead of 1 GiB, to keep the probe small
size = 10 * 2**20
p = torch.nn.Parameter(torch.ones(4))
opt = torch.optim.SGD([p], lr=0.1)
p.grad = torch.ones(4)


def touch(n):
    blocks = [libc.malloc(size) for _ in range(n)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    return blocks


def step():                                # 300 MiB made, touched and freed, then the optimiser step
    for b in touch(30):
        libc.free(b)
    opt.step()


pin = libc.malloc(4096)                    # something long-lived above the blocks: no trimming at the top
for _ in range(3):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
trims = None if allocator._trimmer is None else allocator._trimmer.trims
held = touch(30)                           # the pattern's memory taken: 400 MiB more extend the heap
for b in touch(40) + held:
    libc.free(b)
libc.malloc(4096)                          # and a small block above them, as a step leaves behind
rss = current_rss_bytes()
opt.step()
json.dump({"applied": applied, "faults": faults, "trims_steady": trims, "rss_drop": rss - current_rss_bytes(),
           "trims": None if allocator._trimmer is None else allocator._trimmer.trims}, sys.stdout)
"""

PEAK_PROBE = r"""
import json, sys
from tformer.memory import current_rss_bytes, peak_rss_bytes

peak0, rss0 = peak_rss_bytes(), current_rss_bytes()
block = b"\x01" * 200_000_000              # written, so its pages are resident
peak1, rss1 = peak_rss_bytes(), current_rss_bytes()
del block
json.dump({"peak0": peak0, "rss0": rss0, "peak1": peak1, "rss1": rss1,
           "peak2": peak_rss_bytes(), "rss2": current_rss_bytes()}, sys.stdout)
"""


def _child(code: str, setting: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "TFORMER_MALLOC"}
    if setting is not None:
        env["TFORMER_MALLOC"] = setting
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _int(r: dict[str, object], key: str) -> int:
    value = r[key]
    assert isinstance(value, int), (key, value)
    return value


MiB = 2**20


@needs_glibc
def test_default_serves_big_tensors_from_the_heap_and_hands_huge_ones_back() -> None:
    r = _child(PROBE, None)
    assert r["applied"] is True and r["again"] is True
    assert r["mapped"] == 0  # the 64 MiB block came from the heap, not from its own mmap
    # three steps touch 3 x 28672 pages of 4 KiB; with the memory reused, (almost) none are new
    assert _int(r, "faults") < 200
    # 320 MiB is above the 256 MiB threshold: its own mapping, unmapped (and no longer resident) on free
    assert _int(r, "big_mapped") >= 320 * MiB
    assert _int(r, "big_unmapped") <= 0
    assert _int(r, "big_rss_drop") >= 300 * MiB


@needs_glibc
def test_keep_serves_every_block_from_the_heap_and_keeps_it() -> None:
    r = _child(PROBE, "keep")
    assert r["applied"] is True and r["again"] is True
    assert r["mapped"] == 0 and _int(r, "faults") < 200
    assert r["big_mapped"] == 0  # no mmap at all
    assert _int(r, "big_rss_drop") < 10 * MiB  # freed, still resident


@needs_glibc
def test_system_setting_leaves_glibc_as_it_is() -> None:
    r = _child(PROBE, "system")
    assert r["applied"] is False and r["again"] is False
    assert _int(r, "mapped") >= 64 * MiB  # glibc's default: its own mapping
    assert _int(r, "big_mapped") >= 320 * MiB


@needs_glibc
def test_default_hands_more_than_a_gib_of_free_heap_back_keep_does_not() -> None:
    bounded = _child(TRIM_PROBE, None)
    assert bounded["applied"] is True
    # 1,100 MiB free at the top passes the 1 GiB trim threshold: it goes back; the last 100 MiB stays
    assert _int(bounded, "rss_drop") >= 1000 * MiB
    keep = _child(TRIM_PROBE, "keep")
    assert keep["applied"] is True
    assert _int(keep, "rss_drop") < 50 * MiB


@needs_glibc
def test_default_hands_free_pages_back_after_a_step_that_grew_the_rss() -> None:
    r = _child(STEP_PROBE, None)
    assert r["applied"] is True
    # recurring steps: the freed blocks are reused (10 x 7680 pages touched, almost none new), no trim
    assert _int(r, "faults") < 500 and r["trims_steady"] == 0
    # 700 MiB of freed blocks resident, 400 MiB above what the steps needed: malloc_trim hands them back
    assert r["trims"] == 1
    assert _int(r, "rss_drop") >= 600 * MiB
    keep = _child(STEP_PROBE, "keep")
    assert keep["trims"] is None and _int(keep, "faults") < 500
    assert _int(keep, "rss_drop") < 50 * MiB


def test_peak_rss_grows_with_memory_touched_and_stays_after_it_is_freed() -> None:
    r = _child(PEAK_PROBE, "system")
    if r["peak0"] is None:
        pytest.skip("this system reports no peak RSS")
    peak0, peak1, peak2 = _int(r, "peak0"), _int(r, "peak1"), _int(r, "peak2")
    assert peak1 - peak0 >= 190_000_000
    # a high-water mark: freeing the block leaves it (to the kernel's batched RSS counting, < 1 MB)
    assert peak2 >= peak1 - 1_000_000
    if r["rss0"] is not None:
        assert _int(r, "rss1") - _int(r, "rss0") >= 190_000_000
        assert _int(r, "rss1") <= peak1 + 1_000_000  # read after it: a page or so may have come since
        assert _int(r, "rss2") < _int(r, "rss1") - 150_000_000  # glibc unmaps the freed 200 MB


@pytest.mark.parametrize("value", ["jemalloc", "bounded2", "1"])
def test_unknown_setting_is_an_error_naming_the_variable_and_the_choices(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("TFORMER_MALLOC", value)
    with pytest.raises(ValueError, match=rf"TFORMER_MALLOC='{value}'.*'bounded'.*'keep'.*'system'"):
        allocator.reuse_freed_memory()
    assert allocator._applied is None


@pytest.mark.parametrize(
    ("value", "policy"),
    [(None, "bounded"), ("", "bounded"), ("KEEP", "keep"), (" system ", "system"), ("reuse", "keep")],
)
def test_settings_are_read_case_and_space_insensitively(
    monkeypatch: pytest.MonkeyPatch, value: str | None, policy: str
) -> None:
    if value is None:
        monkeypatch.delenv("TFORMER_MALLOC", raising=False)
    else:
        monkeypatch.setenv("TFORMER_MALLOC", value)
    assert allocator.malloc_policy() == policy
