"""Where tensors' memory comes from: freed blocks reused without page faults, within a bounded footprint.

Why: PyTorch's CPU tensors come from the C library's `malloc`. glibc serves blocks above its mmap
threshold (128 KiB, rising as blocks are freed to at most 32 MiB) with their own `mmap` and unmaps them
on free, so every training step has the kernel map, fault and zero its big tensors again, 4 KiB at a time
(GPT-2 small: the 512 x 50257 logits and their gradient, the embedding's gradient; the Multi30k model:
its 3,000 x 8,000 logits). tformer 0.2 turned both mmap and trimming off (the "keep" policy below): no
more faults, but nothing freed ever went back. Where batch shapes change every step (length-bucketed
translation batches), a freed block rarely fits the next, slightly bigger one, so the heap grows a
little every step around holes it keeps resident: Multi30k's run sat at 7.5 GB on an Intel Xeon, and here
the Multi30k model's RSS grew by 25 MB a step while 0.45 GB of the heap was in use.

`TFORMER_MALLOC` chooses (read once, by `reuse_freed_memory()`):

- "bounded" (the default): `M_MMAP_THRESHOLD` 256 MiB, so every block that recurs in the steps measured
  comes from the heap and a freed one is reused without faults, while a bigger one-off block is mapped
  and handed back on free; `M_TRIM_THRESHOLD` 1 GiB, so more than that free at the heap's top goes back;
  and after every optimiser step (a global `torch.optim` hook) a look at the RSS: once it has grown by
  more than `TRIM_SLACK` (1 GiB) above the lowest step-end RSS since the last trim, `malloc_trim(0)`
  hands every free page of the heap back to the kernel. Steps of fixed shapes never grow and never trim;
  steps of changing shapes pay a trim's re-faults every several steps. glibc builds that cap the mmap
  threshold at 32 MiB refuse 256 MiB; there every block comes from the heap (`M_MMAP_MAX` 0) instead.
- "keep": tformer 0.2's policy, `M_MMAP_MAX` 0 and `M_TRIM_THRESHOLD` at its largest (no hook): the
  fastest where shapes change, at a footprint that only grows. "reuse", its 0.2 name, is read as "keep".
- "system": glibc as it is.

Measured with `benchmarks/malloc_footprint.py` (AMD EPYC, 2 cores, glibc 2.36, torch 2.13; 3 fresh
processes per policy, interleaved; median seconds per step, its spread, and peak RSS):

| workload | system | keep | bounded | tcmalloc (LD_PRELOAD) |
|---|---|---|---|---|
| GPT-2 small fp32 step, 2 x 256 | 2.63 s (2.53-2.66), 2.8 GB | 2.27 s, 3.2 GB | 2.21 s (2.16-2.22), 3.1 GB | 2.25 s, 2.8 GB |
| Multi30k model, 55 steps of ~3,000 tokens | 1.32 s (1.29-1.35), 2.6 GB | 1.17 s, 3.8 GB | 1.24 s (1.23-1.28), 3.1 GB | 1.23 s, 1.8 GB |

So "bounded" keeps all of keep's gain where shapes recur (0.84x system's step) and half of it where they
change (0.94x; keep 0.89x), with a peak that stops at about 1 GiB above what the steps need. A trim at
512 MiB of growth cost most of the rest (0.98x, 2.9 GB). No mallopt setting keeps glibc's heap compact
under changing shapes; tcmalloc and jemalloc, whose size classes keep small blocks out of big holes, do
(tcmalloc: keep's speed at 1.8 GB; jemalloc, which hands memory back on a timer: 1.7 GB, but 1.23x
system's step), but only preloaded before Python starts (`LD_PRELOAD=/path/to/libtcmalloc_minimal.so.4
tformer train ...`, with `TFORMER_MALLOC=system`), which a `pip install` cannot arrange. PyTorch's own
huge-page switch (`THP_MEM_ALLOC_ENABLE=1`) cut the faults but not the time: zeroing the pages is the cost.

tformer's command line and benchmark entry points call `reuse_freed_memory()`; the library never does
behind its user (a process-wide setting): a Python user who wants it calls it once, before big tensors.
On other C libraries (macOS, musl) it does nothing and says so by returning False.

tformer.memory reports the footprint beside the time (`tformer bench`, the training log).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

from tformer.memory import current_rss_bytes

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_MiB = 2**20

# TFORMER_MALLOC value -> the mallopt (parameter, value) pairs it makes, in order; "system" makes none.
_SETTINGS: dict[str, tuple[tuple[int, int], ...]] = {
    # blocks up to 256 MiB from the heap, bigger ones mmap-ed (and unmapped on free); more than 1 GiB
    # free at the heap's top goes back to the kernel; plus the trim after optimiser steps (_Trimmer)
    "bounded": ((_M_MMAP_THRESHOLD, 256 * _MiB), (_M_TRIM_THRESHOLD, 1024 * _MiB)),
    # every block from the heap, nothing ever handed back (tformer 0.2's default)
    "keep": ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)),
    "system": (),
}
# glibc builds that cap the mmap threshold at HEAP_MAX_SIZE / 2 (32 MiB) refuse 256 MiB: then every
# block comes from the heap
_FALLBACK = {(_M_MMAP_THRESHOLD, 256 * _MiB): (_M_MMAP_MAX, 0)}
_ALIASES = {"reuse": "keep"}  # tformer 0.2's name for its (then only) policy
DEFAULT_POLICY = "bounded"
POLICIES = tuple(_SETTINGS)
TRIM_SLACK = 1024 * _MiB  # "bounded": RSS growth between optimiser steps that makes it hand free pages back

_applied: str | None = None  # the policy in force in this process, once set
_trimmer: _Trimmer | None = None


class _Trimmer:
    """After every optimiser step (a global torch hook): when the RSS has grown by more than `slack`
    above the lowest step-end RSS since the last trim, `malloc_trim(0)` hands every free page of glibc's
    heaps back to the kernel. Freed blocks stay where they are, so the next step reuses them at the cost
    of one step's page faults; steps whose shapes recur never grow the RSS and never trim."""

    def __init__(self, malloc_trim: Callable[[int], int], slack: int) -> None:
        self.malloc_trim, self.slack = malloc_trim, slack
        self.floor: int | None = None
        self.trims = 0

    def __call__(self, *_: object) -> None:
        rss = current_rss_bytes()
        if rss is None:
            return
        if self.floor is None or rss < self.floor:
            self.floor = rss  # the first step end after a trim (or a lower one): what the steps need
        elif rss > self.floor + self.slack:
            self.malloc_trim(0)
            self.trims += 1
            self.floor = None


def malloc_policy() -> str:
    """The policy `TFORMER_MALLOC` asks for (default "bounded"); ValueError for an unknown one."""
    setting = os.environ.get("TFORMER_MALLOC", "").strip().lower() or DEFAULT_POLICY
    setting = _ALIASES.get(setting, setting)
    if setting not in _SETTINGS:
        expected = ", ".join(repr(p) for p in POLICIES)
        raise ValueError(
            f"TFORMER_MALLOC={os.environ.get('TFORMER_MALLOC')!r}: expected one of {expected} "
            f"({DEFAULT_POLICY!r} when unset)"
        )
    return setting


def reuse_freed_memory() -> bool:
    """Apply the `TFORMER_MALLOC` policy to glibc's malloc (see the module's doc); idempotent. Call it
    before the first big tensor. Under "bounded" it imports torch to register its optimiser-step hook.

    -> True when a policy that reuses freed memory is in force, False where it is turned off
    (`TFORMER_MALLOC=system`) or the C library is not glibc."""
    global _applied, _trimmer
    if _applied is not None:
        return True
    setting = malloc_policy()
    if setting == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (musl's mallopt does nothing)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    for pair in _SETTINGS[setting]:
        # mallopt returns 1 on success
        if mallopt(*pair) != 1 and (pair not in _FALLBACK or mallopt(*_FALLBACK[pair]) != 1):
            return False
    if setting == "bounded":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _trimmer = _Trimmer(malloc_trim, TRIM_SLACK)
        register_optimizer_step_post_hook(_trimmer)
    _applied = setting
    return True
