"""Kill -9 soak: a training run SIGKILLed again and again, resumed each time, ends bit-equal to one never
interrupted.

    .venv/bin/python benchmarks/kill_soak.py [--kills 30] [--seed 0] [--out runs/kill-soak]

A tiny language model (character-level, dropout on, so the RNG state matters) is trained by the real
command line, `tformer train lm ... --resume`, with a checkpoint every 3 steps. First an uninterrupted
run gives the reference. Then the same run is killed once at every fault point of a save
(`TFORMER_CRASH_AT`, tformer.training.checkpoint.crash_point: after each file write, the fsyncs, the
rename of the directory, the link's creation and its switch, the pruning; at the process's first or
second save), resumed each time; then `--kills` times with SIGKILL after a random delay (start-up,
steps and saves), resumed each time (a run that finishes before its kill starts again from nothing);
then it runs to the end. The final model.safetensors and optimiser state (moments, RNG states) must
equal the reference's bit for bit.
Writes OUT/results.json; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

FAULT_POINTS = [
    "write:config",
    "write:weights",
    "write:state",
    "fsync:files",
    "fsync:dir",
    "rename:checkpoint",
    "fsync:out",
    "link:made",
    "link:switched",
    "fsync:link",
    "pruned",
]
STEPS = 300
TEXT = "".join(f"{i} little pigs went to market, and {i * 7 % 13} came home again.\n" for i in range(300))
SETTINGS = [
    "data.tokenizer=char",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.n_layers=2",
    "model.max_seq_len=32",
    "model.dropout=0.1",
    "train.batch_size=8",
    f"train.max_steps={STEPS}",
    "train.epochs=1000",
    "train.log_every=5",
    "train.save_every_steps=3",
    "train.keep_checkpoints=2",
    "train.lr=1e-3",
    "train.warmup_steps=10",
    "train.eval_every_epochs=1000",
]


def command(data: Path, out: Path, *, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "tformer.cli", "train", "lm", "--train", str(data), "--valid", str(data)]
    return [*cmd, "--out", str(out), "--no-progress", *(["--resume"] if resume else []), *SETTINGS]


def step_of(out: Path) -> int:
    from tformer.training import run_dir
    from tformer.training.checkpoint import load_trainer_state

    found = run_dir.latest(out)
    return -1 if found is None else int(load_trainer_state(found)["trainer"]["step"])


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    ckpt = (out / "checkpoint").resolve()
    tensors = {f"model/{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    tensors.update({f"state/{k}": v for k, v in load_file(str(ckpt / "trainer_state.safetensors")).items()})
    return tensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="random SIGKILLs (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/kill-soak")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "text.txt"
    data.write_text(TEXT)
    env = {**os.environ, "TFORMER_CRASH_AT": ""}
    env.pop("TFORMER_CRASH_AT")

    reference, soaked = root / "reference", root / "soaked"
    for d in (reference, soaked):
        if d.exists():
            shutil.rmtree(d)
    t0 = time.perf_counter()
    subprocess.run(command(data, reference, resume=False), env=env, check=True, capture_output=True)
    whole = time.perf_counter() - t0
    t0 = time.perf_counter()  # start-up: imports, data, tokenizer, model, one step, its save
    one = command(data, root / "one-step", resume=False) + ["--overwrite", "train.max_steps=1"]
    subprocess.run(one, env=env, check=True, capture_output=True)
    start_up = time.perf_counter() - t0
    print(f"reference run: {STEPS} steps in {whole:.1f} s (start-up {start_up:.1f} s)")

    faults: list[dict[str, object]] = []
    for point in FAULT_POINTS:
        nth = rng.randint(1, 2)  # the first or second save of this process: always reached
        fault_env = {**env, "TFORMER_CRASH_AT": f"{point}@{nth}"}
        done = subprocess.run(
            command(data, soaked, resume=True), env=fault_env, capture_output=True, text=True
        )
        if done.returncode not in (-signal.SIGKILL, 0):
            print(f"{point}: exit {done.returncode}\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        faults.append({"point": point, "save": nth, "killed": done.returncode == -signal.SIGKILL})
        print(
            f"fault {point}@{nth}: {'killed' if done.returncode else 'finished'}, at step {step_of(soaked)}"
        )

    kills: list[dict[str, object]] = []
    while len(kills) < args.kills:
        # Kills land in start-up, steps and saves (a save every 3 steps); at most a fifth of the run's
        # training time after start-up, so that most runs are killed rather than finishing (one that
        # finishes starts again from nothing).
        delay = rng.uniform(0.5 * start_up, start_up + (whole - start_up) / 5)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        proc = subprocess.Popen(command(data, soaked, resume=True), env=env, **quiet)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if proc.returncode not in (-signal.SIGKILL, 0):
            print(f"resume failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        if proc.returncode == 0:  # finished before the kill: start again
            shutil.rmtree(soaked)
            continue
        kills.append({"after_s": round(delay, 2), "checkpoint_step": step_of(soaked)})
        print(f"kill {len(kills):2d} after {delay:5.2f} s: latest checkpoint at step {step_of(soaked)}")

    subprocess.run(command(data, soaked, resume=True), env=env, check=True, capture_output=True)
    a, b = final_tensors(reference), final_tensors(soaked)
    differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    result = {
        "steps": STEPS,
        "random_kills": kills,
        "fault_kills": faults,
        "tensors_compared": len(a),
        "tensors_differing": differ,
        "bit_equal": not differ,
    }
    (root / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"{len(kills)} random kills + {sum(bool(f['killed']) for f in faults)} at fault points: "
        + (
            "final weights and optimiser state bit-equal to the uninterrupted run"
            if not differ
            else f"{len(differ)} tensors differ: {differ[:5]}"
        )  # fmt: skip
    )
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
