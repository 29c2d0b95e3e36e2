"""Step time beside peak memory under each malloc policy (tformer.allocator), one fresh process per run.

    .venv/bin/python benchmarks/malloc_footprint.py [--workloads gpt2-small,seq2seq]
        [--policies system,keep,bounded,...] [--repeats 3] [--out runs/malloc_footprint.json]

mallopt settings are process-wide and must be made before the first big tensor, so every (workload,
policy) pair runs in its own interpreter, and the pairs are interleaved (system keep bounded system keep
bounded ...) so that load from other processes falls on every policy alike. Workloads:

- gpt2-small: `tformer bench train`'s GPT-2-small float32 step (12 x 768, vocabulary 50257, batch
  2 x 256): forward, cross-entropy, backward, fused AdamW. The same shapes every step.
- seq2seq: the Multi30k model (configs/multi30k_de_en.toml: 3+3 layers, d_model 256, shared 8000-token
  vocabulary, 9M parameters) on batches of about 3,000 padded tokens whose (B, S, T) change every step,
  as length-bucketed batches do; label-smoothed cross-entropy, clipping, fused AdamW.

Per run: the time per step after the warm-up (median for gpt2-small; the mean over the same seeded
sequence of shapes for seq2seq), minor page faults per step, peak RSS (VmHWM) and the RSS at the end.
Printed: a markdown table per workload, medians over the repeats with their spread (min-max).

Policies: the library's (`TFORMER_MALLOC=system|keep|bounded`, applied by reuse_freed_memory()), and
candidates spelled out here as raw mallopt settings; `jemalloc` / `tcmalloc` (LD_PRELOAD, glibc left
alone) are added when `ldconfig -p` finds the library.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tformer import allocator
from tformer.memory import current_rss_bytes, format_bytes, peak_rss_bytes

# glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8
MiB = 2**20
INT_MAX = 2**31 - 1

# name -> how a child process applies it: TFORMER_MALLOC for the library's policies, raw mallopt pairs
# for candidates (applied before torch is imported), LD_PRELOAD for another allocator.
POLICIES: dict[str, dict[str, Any]] = {
    "system": {"env": {"TFORMER_MALLOC": "system"}},
    "keep": {"env": {"TFORMER_MALLOC": "keep"}},  # mmap off, no trimming: the 0.2 default
    "bounded": {"env": {"TFORMER_MALLOC": "bounded"}},
    # candidates
    # PyTorch's own switch (c10's alloc_cpu, read once at the first allocation): blocks of 2 MiB and more
    # aligned to 2 MiB and madvise(MADV_HUGEPAGE)-d, so a fault maps 2 MiB, not 4 KiB
    "system-thp": {"env": {"TFORMER_MALLOC": "system", "THP_MEM_ALLOC_ENABLE": "1"}},
    "bounded-thp": {"env": {"TFORMER_MALLOC": "bounded", "THP_MEM_ALLOC_ENABLE": "1"}},
    "keep-thp": {"env": {"TFORMER_MALLOC": "keep", "THP_MEM_ALLOC_ENABLE": "1"}},
    "bounded-512M": {"env": {"TFORMER_MALLOC": "bounded"}, "slack": 512 * MiB},  # trim at 512 MiB growth
    "thr256-trim1g": {"mallopt": [(M_MMAP_THRESHOLD, 256 * MiB), (M_TRIM_THRESHOLD, 1024 * MiB)]},
    "thr256-trim256": {"mallopt": [(M_MMAP_THRESHOLD, 256 * MiB), (M_TRIM_THRESHOLD, 256 * MiB)]},
    "thr32-trim1g": {"mallopt": [(M_MMAP_THRESHOLD, 32 * MiB), (M_TRIM_THRESHOLD, 1024 * MiB)]},
    "nommap-trim1g": {"mallopt": [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1024 * MiB)]},
    "keep-arena1": {"mallopt": [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, INT_MAX), (M_ARENA_MAX, 1)]},
    "thr256-trim1g-arena1": {
        "mallopt": [(M_MMAP_THRESHOLD, 256 * MiB), (M_TRIM_THRESHOLD, 1024 * MiB), (M_ARENA_MAX, 1)]
    },
}
PRELOADS = {"jemalloc": ("libjemalloc.so",), "tcmalloc": ("libtcmalloc.so", "libtcmalloc_minimal.so")}


def find_preload(name: str) -> str | None:
    """The path ldconfig knows for a preloadable allocator, or None."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in listing.splitlines():
        name_part, _, path = line.strip().partition(" => ")
        if path and name_part.startswith(PRELOADS[name]) and "debug" not in name_part:
            return path.strip()
    return None


# ---------------------------------------------------------------------------------------------- child


def _apply(policy: str) -> str:
    spec = POLICIES.get(policy, {})
    if "mallopt" in spec:
        libc = ctypes.CDLL("libc.so.6")
        for param, value in spec["mallopt"]:
            if libc.mallopt(param, value) != 1:
                raise RuntimeError(f"mallopt({param}, {value}) refused")
        return "mallopt"
    if policy in PRELOADS:
        return "LD_PRELOAD=" + os.environ.get("LD_PRELOAD", "")
    if "slack" in spec:
        allocator.TRIM_SLACK = spec["slack"]
    return "applied" if allocator.reuse_freed_memory() else "not applied"


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (/proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Record:
    """Per step: seconds, CPU seconds, RSS after it, and minor page faults during it."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.rss: list[int] = []
        self.faults: list[int] = []
        self._t0, self._c0, self._f0 = 0.0, 0.0, 0

    def start(self) -> None:
        self._f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self._c0 = _own_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(_own_seconds() - self._c0)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._f0)
        self.rss.append(current_rss_bytes() or 0)


def _gpt2_small(rec: _Record, steps: int) -> None:
    import torch
    import torch.nn.functional as F

    from tformer.bench.common import GPTShape
    from tformer.models.lm import LanguageModel

    shape = GPTShape(n_layers=12, n_heads=12, d_model=768, vocab_size=50257, block=256, batch=2)
    torch.manual_seed(0)
    model = LanguageModel(shape.lm_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    data = torch.randint(shape.vocab_size, (steps, shape.batch, shape.block + 1))
    for batch in data:
        rec.start()
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T)
        logits = model(x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, shape.vocab_size), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits, loss
        rec.stop()


def _seq2seq_shapes(n: int, batch_tokens: int = 3000, seed: int = 0) -> list[tuple[int, int, int]]:
    """n (B, S, T): a batch's longest source and target, and as many sentences as fit in batch_tokens
    (Multi30k's BPE lengths: about 14 tokens, up to ~50)."""
    import random

    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        s = min(60, max(4, round(rng.lognormvariate(2.6, 0.45))))
        t = min(60, max(4, s + rng.randint(-3, 4)))
        shapes.append((max(1, batch_tokens // max(s, t)), s, t))
    return shapes


def _seq2seq(rec: _Record, steps: int) -> None:
    import torch
    import torch.nn.functional as F

    from tformer.config import Seq2SeqConfig
    from tformer.models.seq2seq import Seq2Seq

    vocab = 8000
    config = Seq2SeqConfig(
        src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=256, n_heads=8, d_ff=1024, n_layers=3,
        dropout=0.1, max_seq_len=128, share_embeddings=True, tie_output=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Seq2Seq(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)
    g = torch.Generator().manual_seed(1)
    for b, s, t in _seq2seq_shapes(steps):
        src = torch.randint(4, vocab, (b, s), generator=g)  # (B, S)
        tgt = torch.randint(4, vocab, (b, t + 1), generator=g)  # (B, T + 1)
        # padding: row i is shorter by a seeded amount, as in a length-sorted batch
        cut_s = torch.randint(0, max(1, s // 4), (b, 1), generator=g)
        cut_t = torch.randint(0, max(1, t // 4), (b, 1), generator=g)
        src.masked_fill_(torch.arange(s) >= s - cut_s, 0)
        tgt.masked_fill_(torch.arange(t + 1) >= t + 1 - cut_t, 0)
        rec.start()
        logits = model(src, tgt[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(
            logits.reshape(-1, vocab), tgt[:, 1:].reshape(-1), ignore_index=0, label_smoothing=0.1
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits, loss
        rec.stop()


WORKLOADS = {"gpt2-small": (_gpt2_small, 8, 3), "seq2seq": (_seq2seq, 50, 5)}  # fn, steps, warm-up


def child(workload: str, policy: str, steps: int | None) -> dict[str, Any]:
    how = _apply(policy)  # before torch: the setting must precede the first big block
    fn, default_steps, warmup = WORKLOADS[workload]
    rec = _Record()
    wall0, busy0, own0 = time.perf_counter(), _busy_seconds(), _own_seconds()
    fn(rec, warmup + (steps or default_steps))
    wall, busy1, own = time.perf_counter() - wall0, _busy_seconds(), _own_seconds() - own0
    # the share of the machine other processes kept busy meanwhile: what disturbs the timing
    others = (
        None if busy0 is None or busy1 is None else (busy1 - busy0 - own) / (wall * (os.cpu_count() or 1))
    )
    times, faults, rss = rec.times[warmup:], rec.faults[warmup:], rec.rss
    cpu = rec.cpu[warmup:]
    n = len(rss)
    heap = {} if policy in PRELOADS else _mallinfo()  # glibc's counters say nothing of another malloc
    trimmer = getattr(allocator, "_trimmer", None)  # "bounded": how often it handed free pages back
    return {
        "workload": workload,
        "policy": policy,
        "how": how,
        "step_s": statistics.median(times) if workload == "gpt2-small" else statistics.fmean(times),
        "cpu_s": statistics.median(cpu) if workload == "gpt2-small" else statistics.fmean(cpu),
        "faults_per_step": statistics.fmean(faults),
        "others_busy": others,
        "peak_rss": peak_rss_bytes(),
        "final_rss": rss[-1],
        "trims": trimmer.trims if trimmer is not None else None,
        "rss_quartiles": [rss[n // 4], rss[n // 2], rss[3 * n // 4], rss[-1]],
        **heap,
    }


def _mallinfo() -> dict[str, int]:
    """glibc's view at the end: bytes in use / free in its heaps, in mmap-ed blocks; and the RSS left
    after malloc_trim(0) hands every free page back (what of the RSS was freed memory glibc kept)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = libc.mallinfo2
    except (OSError, AttributeError):
        return {}

    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (*names, "keepcost")]

    info.restype = MallInfo2
    m = info()
    libc.malloc_trim(0)
    return {"heap_used": m.uordblks, "heap_free": m.fordblks, "mmapped": m.hblkhd,
            "rss_after_trim": current_rss_bytes() or 0}  # fmt: skip


# --------------------------------------------------------------------------------------------- parent


def _run_quiet(workload: str, policy: str, steps: int | None, max_busy: float, tries: int) -> dict[str, Any]:
    """Rerun (after a pause) while other processes kept more than `max_busy` of the machine busy; -> the
    quietest of at most `tries` runs."""
    runs = []
    for i in range(tries):
        runs.append(_run(workload, policy, steps))
        if (runs[-1]["others_busy"] or 0.0) <= max_busy:
            break
        if i + 1 < tries:
            print(f"  others kept {runs[-1]['others_busy']:.0%} busy: again", file=sys.stderr, flush=True)
            time.sleep(30)
    best = min(runs, key=lambda r: r["others_busy"] or 0.0)
    best["tries"] = len(runs)
    return best


def _run(workload: str, policy: str, steps: int | None) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("TFORMER_MALLOC", None)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    env.update(POLICIES.get(policy, {}).get("env", {}))
    if policy in PRELOADS:
        env["LD_PRELOAD"] = str(find_preload(policy))
        env["TFORMER_MALLOC"] = "system"
    cmd = [sys.executable, __file__, "--child", workload, policy]
    if steps:
        cmd += ["--steps", str(steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{workload} under {policy} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _table(workload: str, runs: list[dict[str, Any]], policies: list[str]) -> str:
    def spread(xs: list[float], fmt: str) -> str:
        return f"{fmt.format(min(xs))}-{fmt.format(max(xs))}"

    base = statistics.median(r["step_s"] for r in runs if r["policy"] == policies[0])
    lines = [
        f"| policy | s/step (median) | spread | vs {policies[0]} | CPU s/step | faults/step | peak RSS | spread "
        "| final RSS | trims | others busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in policies:
        rs = [r for r in runs if r["policy"] == p]
        if not rs:
            continue
        t = [r["step_s"] for r in rs]
        peak = [r["peak_rss"] for r in rs]
        trims = "-" if rs[0]["trims"] is None else f"{statistics.median(r['trims'] for r in rs):g}"
        lines.append(
            f"| {p} | {statistics.median(t):.3f} | {spread(t, '{:.3f}')} | "
            f"{statistics.median(t) / base:.2f}x | {statistics.median(r['cpu_s'] for r in rs):.3f} | "
            f"{statistics.median(r['faults_per_step'] for r in rs):,.0f} | "
            f"{format_bytes(int(statistics.median(peak)))} | "
            f"{format_bytes(min(peak))}-{format_bytes(max(peak))} | "
            f"{format_bytes(int(statistics.median(r['final_rss'] for r in rs)))} | "
            f"{trims} | {max(r['others_busy'] or 0.0 for r in rs):.0%} max |"
        )
    return f"**{workload}** ({len(runs) // len(policies)} processes per policy)\n\n" + "\n".join(lines)


def _cpu() -> str:
    from tformer.accel.tune import fingerprint  # imports torch: only for the report, after the runs

    return str(fingerprint()["cpu"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="gpt2-small,seq2seq")
    parser.add_argument("--policies", default="system,keep,bounded")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: per workload)")
    parser.add_argument("--out", default=None, help="also write every run as JSON here")
    parser.add_argument("--max-busy", type=float, default=0.1, help="rerun while others used more")
    parser.add_argument("--tries", type=int, default=4, help="runs at most per (workload, policy, repeat)")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return 0
    workloads = args.workloads.split(",")
    policies = args.policies.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; expected one of {sorted(WORKLOADS)}")
    for p in list(policies):
        if p in PRELOADS and find_preload(p) is None:
            print(f"{p}: not installed (ldconfig -p), left out", file=sys.stderr)
            policies.remove(p)
        elif p not in POLICIES and p not in PRELOADS:
            parser.error(f"unknown policy {p!r}; expected one of {sorted(POLICIES) + sorted(PRELOADS)}")
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in workloads}
    for i in range(args.repeats):
        for w in workloads:
            for p in policies:  # interleaved: A B C A B C ...
                r = _run_quiet(w, p, args.steps, args.max_busy, args.tries)
                runs[w].append(r)
                print(f"[{i + 1}/{args.repeats}] {w} {p}: {r['step_s']:.3f} s/step, peak {r['peak_rss'] / 1e9:.2f} GB, "
                      f"others {r['others_busy'] or 0:.0%} busy",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"CPU: {_cpu()}, {os.cpu_count()} logical CPUs\n")
    for w in workloads:
        print(_table(w, runs[w], policies) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
