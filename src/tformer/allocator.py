"""Keep freed memory in the process for reuse, so that big tensors don't page-fault on every step.

Why: PyTorch's CPU tensors come from the C library's `malloc`. glibc serves every block above 32 MiB (and,
by default, above a threshold it adjusts as it goes) with a fresh `mmap` and gives it back to the kernel
with `munmap` on free. A training step of GPT-2 small makes and frees several such blocks (the logits and
their gradient, 512 x 50257 floats; the embedding gradient, 50257 x 768; bfloat16 copies of the weights
under autocast), so every step the kernel maps, page-faults and zeroes hundreds of megabytes again,
4 KiB at a time. On this project's machine that was a third of a float32 step (1.55 s -> 1.08 s per
step, `bench train`'s GPT-2-small shape) and 30% of a bfloat16 one (0.96 s -> 0.69 s), and the step
times scattered by +-30% with the kernel's page handling (docs/decisions.md, decision 51). This is the
same problem that PyTorch's CPU launcher (`python -m torch.backends.xeon.run_cpu`) meets by preloading
jemalloc or tcmalloc; this module needs nothing preloaded.

`reuse_freed_memory()` tells glibc, through `mallopt`, to serve large blocks from its heap as well
(`M_MMAP_MAX = 0`) and not to hand freed memory back to the kernel (`M_TRIM_THRESHOLD` at its largest,
2 GiB kept free at the top of the heap). Freed blocks are then reused as they are. The cost: the process
keeps its peak memory as long as it lives (its resident size does not shrink after a big tensor is
freed), which is what a training or benchmarking process does anyway.

tformer's command line and benchmark entry points call it; the library never does behind its user (a
process-wide setting): a Python user who wants it calls it once at the start.
`TFORMER_MALLOC=system` in the environment turns it off. On other C libraries (macOS, musl) it does
nothing and says so by returning False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def reuse_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory (see the module's doc); idempotent.

    -> True when the setting is in force, False where it is turned off (`TFORMER_MALLOC=system`) or the
    C library is not glibc."""
    global _applied
    if _applied:
        return True
    setting = os.environ.get("TFORMER_MALLOC", "reuse")
    if setting not in ("reuse", "system"):
        raise ValueError(f"TFORMER_MALLOC={setting!r}: expected 'reuse' (the default) or 'system'")
    if setting == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    return _applied
