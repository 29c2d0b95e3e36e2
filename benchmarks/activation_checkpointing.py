"""Activation checkpointing (train.checkpoint_activations): peak memory and step time of a training step of
the paper's base translation model (Seq2SeqConfig's defaults: 6 + 6 layers, d_model 512, 8 heads, d_ff
2048, 32,000-token vocabularies, dropout 0.1), on against off.

Each setting runs in its own process (a fresh heap: the peak of one cannot hide in the other's freed
memory), alternately on / off for `--repeats` rounds. A process builds the model and AdamW, takes one
warm-up step (the optimiser's state now exists), resets the kernel's resident high-water mark (Linux:
/proc/self/clear_refs) and takes `--steps` more: "peak RSS" is the most resident memory during those steady
steps (weights, gradients, Adam state and the step's activations); "step memory" subtracts the resident
memory before the first step (interpreter, torch, weights) and the Adam state's bytes, leaving what a step
adds: activations, gradients, temporaries, and what the heap keeps of them. Step time: the median step.
`--malloc cli`: each process first sets the allocator as `tformer train` does (tformer.allocator,
TFORMER_MALLOC's policy); the default leaves glibc's malloc as a library user has it.

    .venv/bin/python benchmarks/activation_checkpointing.py [--batch 24] [--length 64] [--repeats 2]
        [--malloc library|cli]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from tformer.accel.machine import fingerprint
from tformer.config import Seq2SeqConfig
from tformer.memory import current_rss_bytes, format_bytes, peak_rss_bytes
from tformer.models import Seq2Seq
from tformer.models.checkpointing import set_activation_checkpointing


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(on: bool, batch: int, length: int, steps: int, malloc: str) -> dict[str, Any]:
    """One process's measurement (`--child on|off`)."""
    if malloc == "cli":
        from tformer.allocator import reuse_freed_memory

        reuse_freed_memory()
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig()).train()
    set_activation_checkpointing(model, on)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    c = model.config
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, c.src_vocab_size, (batch, length), generator=g)  # (B, S)
    tgt = torch.randint(4, c.tgt_vocab_size, (batch, length + 1), generator=g)  # (B, T + 1)

    def step() -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = model(src, tgt[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    weights = current_rss_bytes() or 0  # the interpreter, torch and the weights
    step()  # warm-up: allocator, Adam state
    adam = sum(t.nbytes for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
    reset = reset_peak_rss()
    times = [step() for _ in range(steps)]
    return {
        "on": on,
        "peak_rss": peak_rss_bytes(),
        "before": weights + adam,
        "peak_reset": reset,
        "step_s": statistics.median(times),
        "times": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=24, help="sentence pairs per step (B)")
    ap.add_argument("--length", type=int, default=64, help="source and target tokens per sentence (S = T)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (on, off) processes")
    ap.add_argument("--malloc", choices=("library", "cli"), default="library", help="the allocator setting")
    ap.add_argument("--json", help="also write the raw measurements here")
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child == "on", a.batch, a.length, a.steps, a.malloc)))
        return
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for _ in range(a.repeats):
        for mode in ("on", "off"):
            cmd = [sys.executable, __file__, "--child", mode]
            cmd += ["--batch", str(a.batch), "--length", str(a.length), "--steps", str(a.steps)]
            cmd += ["--malloc", a.malloc]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs[r["on"]].append(r)
            print(f"  {mode}: {r}", file=sys.stderr)
    cpu = fingerprint()["cpu"]  # /proc/cpuinfo's model name, as lscpu's Model name
    print(
        f"Paper-base Seq2Seq (6 + 6 layers, d_model 512, vocab 32,000), batch {a.batch} x {a.length} "
        f"tokens, fp32, {torch.get_num_threads()} threads, {cpu}, torch {torch.__version__}, malloc "
        f"{a.malloc}; "
        f"{a.repeats} process(es) per setting, median of {a.steps} steps each\n"
    )
    print("| checkpoint_activations | peak RSS | step memory | step time |")
    print("|---|---|---|---|")
    summary = {}
    for on in (False, True):
        rs = runs[on]
        peak = min(int(r["peak_rss"]) for r in rs)
        over = min(int(r["peak_rss"]) - int(r["before"]) for r in rs)
        t = statistics.median(float(r["step_s"]) for r in rs)
        summary[on] = (peak, over, t)
        print(f"| {str(on).lower()} | {format_bytes(peak)} | {format_bytes(over)} | {t:.2f} s |")
    (p0, o0, t0), (p1, o1, t1) = summary[False], summary[True]
    print(
        f"\npeak RSS {p1 / p0:.2f}x, the step's own memory {o1 / o0:.2f}x, step time {t1 / t0:.2f}x "
        "(on / off)"
    )
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump({"cpu": cpu, "batch": a.batch, "length": a.length, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
