"""`tformer bench train`: training speed of tformer's LanguageModel against Hugging Face GPT-2 and a
`torch.nn.TransformerEncoder` stack of the same shape, in one run.

Shapes: nanoGPT's CPU "baby" model (4 layers, 4 heads, 128 dims, block 64, batch 12, vocabulary 65) and
GPT-2 small (12 layers, 12 heads, 768 dims, block 256, batch 2, vocabulary 50257). Every model starts from
the same weights (a seeded Hugging Face GPT2LMHeadModel, copied into the others), sees the same batches
(windows of a seeded Markov token stream) and takes the same AdamW step on the same cross-entropy.

Two phases per shape:
1. Loss curves: each model, eagerly, for `loss_steps` steps in float32 and in bfloat16 autocast, from
   the same weights on the same batches; the largest gap to Hugging Face's loss shows the curves agree.
2. Speed: per precision, the models (tformer as the command line trains a long run: tformer.accel's
   kernels, and compiled steps where train.compile = "auto" measured them faster on this model, once per
   machine; the same model without accel's kernels, eager, "tformer (stock)", what TFORMER_ACCEL=off
   gives; the same model with the other kind of step, "tformer+compile" or "tformer (eager)") are timed
   interleaved (A B C A B C ...)
   for `repeats` rounds of `steps` steps after a warm-up; medians. Model FLOPs utilisation divides the
   model's FLOPs per step (6 N + 12 L C T per token) by the step time and this machine's matmul ceiling
   of the same precision, measured at the start of the same run.

Hugging Face is optional (`pip install -e .[bench]`); without it the tformer and torch rows still run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer import accel
from tformer.bench.common import (
    GPTShape,
    TorchEncoderLM,
    bench_device,
    gpt2_into_lm,
    gpt2_into_torch_encoder,
    hf_gpt2,
    lm_into_torch_encoder,
    machine_facts,
    machine_line,
    markov_tokens,
    matmul_ceiling,
    pyplot,
    synchronize,
    write_outputs,
)
from tformer.models.lm import LanguageModel
from tformer.training import compiling

SHAPES = {
    "baby": GPTShape(n_layers=4, n_heads=4, d_model=128, vocab_size=65, block=64, batch=12),
    "gpt2-small": GPTShape(n_layers=12, n_heads=12, d_model=768, vocab_size=50257, block=256, batch=2),
}
# On a GPU the same names are GPU-sized: nanoGPT's GPT-2 recipe per device (batch 12 of 1024 tokens)
GPU_SHAPES = {
    "baby": SHAPES["baby"],
    "gpt2-small": GPTShape(n_layers=12, n_heads=12, d_model=768, vocab_size=50257, block=1024, batch=12),
}
DEFAULT_SHAPES = {"cpu": ("baby", "gpt2-small"), "cuda": ("gpt2-small",)}  # baby is launch-bound on a GPU
PRECISIONS = ("fp32", "bf16")
SEED = 0
STOCK = "tformer (stock)"  # the row of tformer's model without tformer.accel's kernels
COMPILED, EAGER = "tformer+compile", "tformer (eager)"  # the kind of step the default row does not take


def _compile_auto(lm: nn.Module, batches: Tensor, precision: str) -> tuple[bool, str]:
    """What train.compile = "auto" takes for a long run of this model and batch (training/compiling.py:
    the model's forward and backward timed eager and compiled, once per machine, cached)."""
    x, y = batches[0][:, :-1], batches[0][:, 1:]

    def loss() -> Tensor:
        logits = lm(x).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")

    return compiling.decide(
        lm,
        loss,
        precision=precision,
        device=batches.device,
        distributed=False,
        batches=list(batches),
        step_s=math.inf,
        remaining_s=math.inf,
        tuner=accel.tuner(),
    )


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Runner:
    """One model with its optimiser and its own cursor into the shared batch sequence."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        logits: Callable[[Tensor], Tensor],
        batches: Tensor,
        stock: bool = False,
        compiled: bool | None = None,
    ):
        self.name, self.model, self.logits, self.batches = name, model, logits, batches
        self.stock = stock  # tformer's model, run for this row without tformer.accel's paths
        self.compiled = compiled  # tformer's model: compiled training steps (training/compiling.py) or not
        model.train()
        # the same AdamW for every model (nanoGPT's learning rate for the baby shape), torch's fused kernel
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
        self.position = 0

    def step(self, precision: str) -> Tensor:
        """One training step on the next batch; -> the loss, not read here (no host sync in the loop)."""
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        x, y = batch[:, :-1], batch[:, 1:]
        paths = accel.reverted(self.model) if self.stock else contextlib.nullcontext()
        if self.compiled is not None:
            compiling.set_compiled(self.model, self.compiled)
        with paths, _autocast(precision, self.batches.device):
            logits = self.logits(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def _batches(shape: GPTShape, n: int, seed: int, device: torch.device | None = None) -> Tensor:
    """n batches (n, B, block + 1) of windows of a seeded Markov token stream (the same on any device)."""
    stream = markov_tokens(shape.vocab_size, max(20_000, 4 * shape.block * shape.batch), seed)
    g = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(len(stream) - shape.block - 1, (n, shape.batch), generator=g)
    return stream[starts[..., None] + torch.arange(shape.block + 1)].to(device or "cpu")


class _WithLogits(Protocol):
    """A model's output object (tformer's LMOutput, Hugging Face's CausalLMOutput)."""

    @property
    def logits(self) -> Tensor: ...


def _lm_logits(model: Callable[[Tensor], _WithLogits]) -> Callable[[Tensor], Tensor]:
    return lambda x: model(x).logits


def _hf_logits(model: Callable[..., _WithLogits]) -> Callable[[Tensor], Tensor]:
    return lambda x: model(input_ids=x).logits


def _models(shape: GPTShape, batches: Tensor, *, with_hf: bool) -> list[_Runner]:
    """tformer, Hugging Face GPT-2 (if wanted and installed) and the torch encoder, all from one seeded
    Hugging Face initialisation (or, without transformers, from tformer's, copied into the torch stack).
    Every copy is made before any model trains; then all move to the batches' device."""
    hf: nn.Module | None = hf_gpt2(shape, SEED) if with_hf else None
    torch.manual_seed(SEED)
    lm = LanguageModel(shape.lm_config())
    enc = TorchEncoderLM(shape)
    if hf is not None:
        gpt2_into_lm(hf, lm)
        gpt2_into_torch_encoder(hf, enc)
    else:
        lm_into_torch_encoder(lm, enc)
    device = batches.device
    lm, enc = lm.to(device), enc.to(device)
    hf = None if hf is None else hf.to(device)
    accel.apply(lm)  # as the command line trains it (a no-op under TFORMER_ACCEL=off)
    runners = [_Runner("tformer", lm, _lm_logits(lm), batches)]
    if hf is not None:
        runners.append(_Runner("hf-gpt2", hf, _hf_logits(hf), batches))
    runners.append(_Runner("torch-encoder", enc, enc, batches))
    return runners


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def loss_curves(
    shape: GPTShape,
    steps: int,
    *,
    precisions: tuple[str, ...],
    with_hf: bool,
    device: torch.device | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Per precision, per model: the first `steps` training losses from the same weights and batches."""
    batches = _batches(shape, steps, SEED, device)
    curves: dict[str, dict[str, list[float]]] = {}
    for precision in precisions:
        curves[precision] = {}
        for runner in _models(shape, batches, with_hf=with_hf):
            curves[precision][runner.name] = [float(runner.step(precision)) for _ in range(steps)]
        gc.collect()
    return curves


def speed(
    shape: GPTShape,
    *,
    precisions: tuple[str, ...],
    steps: int,
    repeats: int,
    compile: bool,
    with_hf: bool,
    ceiling: dict[str, float],
    ceiling_n: int = 2048,
    choices: dict[str, str] | None = None,
    compile_auto: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Interleaved timing of every model per precision; -> one row per (model, precision). MFU is against
    the median of the matmul ceilings measured at the start of the run and after each round of timings.
    On a GPU every timing starts and ends with the device idle."""
    device = torch.device("cpu") if device is None else device
    rows = []
    batches = _batches(shape, 64, SEED + 7, device)
    for precision in precisions:
        runners = _models(shape, batches, with_hf=with_hf)
        lm = runners[0].model
        # the command line's default for a long run: train.compile = "auto", measured on this model
        auto, why = (
            _compile_auto(lm, batches, precision) if compile else (False, "not measured: --no-compile")
        )
        if compile_auto is not None:
            compile_auto[precision] = {"compiled": auto, "why": why}
        print(
            f"  train.compile=auto, {precision}: {'compiled' if auto else 'eager'} ({why})", file=sys.stderr
        )
        runners[0].compiled = auto
        if compile:  # the other kind: the same module and optimiser, eager or compiled steps
            c = _Runner(EAGER if auto else COMPILED, lm, _lm_logits(lm), batches, compiled=not auto)
            c.opt = runners[0].opt
            runners.insert(1, c)
            compiling.compile_steps(lm)  # once, kept; each row sets its own kind before its forward
        if accel.mode() != "off":  # what tformer.accel's paths are worth: the same model without them
            a = _Runner(STOCK, lm, _lm_logits(lm), batches, stock=True, compiled=False)
            a.opt = runners[0].opt
            runners.insert(1, a)
        for r in runners:  # warm-up (and compilation)
            t0 = time.perf_counter()
            for _ in range(2):
                r.step(precision)
            synchronize(device)
            print(f"  {r.name} {precision} warm-up {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        times: dict[str, list[float]] = {r.name: [] for r in runners}
        kind = "float32" if precision == "fp32" else "bfloat16"
        peaks: list[float] = []  # the ceiling again after every round: it moves during a run
        for _ in range(repeats):
            for r in runners:
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    r.step(precision)
                synchronize(device)
                times[r.name].append((time.perf_counter() - t0) / steps)
            peaks.append(matmul_ceiling(ceiling_n, repeats=3, precisions=(kind,), device=device)[kind])
        flops = shape.flops_per_token() * shape.batch * shape.block
        peak = statistics.median([ceiling[kind], *peaks])
        for r in runners:
            sec = statistics.median(times[r.name])
            rows.append(
                {
                    "model": r.name,
                    "precision": precision,
                    "seconds_per_step": sec,
                    "steps_per_s": 1.0 / sec,
                    "tokens_per_s": shape.batch * shape.block / sec,
                    "mfu": flops / sec / 1e9 / peak,
                    "ceiling_gflops": peak,
                    "ceilings_gflops": [ceiling[kind], *peaks],
                    "all_seconds": times[r.name],
                }
            )
            print(
                f"  {r.name:16s} {precision} {1000 * sec:9.1f} ms/step  {rows[-1]['mfu']:.0%} of ceiling",
                file=sys.stderr,
            )
        if choices is not None:  # the kernels tformer's model chose here, per shape class
            choices.update(accel.recorded(runners[0].model) or {})
        compiling.set_compiled(lm, False)
        del runners, lm
        gc.collect()
    return rows


def run(
    *,
    shapes: dict[str, GPTShape] | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    steps: dict[str, int] | None = None,
    repeats: int = 5,
    loss_steps: dict[str, int] | None = None,
    compile: bool = True,
    out_dir: str | Path = "runs/bench-train",
    ceiling_n: int | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Measure every shape; write train.json, train.md and train.png under `out_dir`. `device`: cpu (the
    default) or a CUDA GPU, whose matmul ceiling is measured at n = 8192 (2048 on the CPU)."""
    device = torch.device("cpu") if device is None else device
    on_gpu = device.type == "cuda"
    shapes = (GPU_SHAPES if on_gpu else SHAPES) if shapes is None else shapes
    ceiling_n = (8192 if on_gpu else 2048) if ceiling_n is None else ceiling_n
    steps = {"baby": 10, "gpt2-small": 10 if on_gpu else 1, **(steps or {})}
    loss_steps = {"baby": 20, "gpt2-small": 4, **(loss_steps or {})}
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; expected one of {', '.join(PRECISIONS)}")
    with_hf = have_transformers()
    if not with_hf:
        print(
            "transformers is not installed: no Hugging Face rows (pip install -e .[bench])", file=sys.stderr
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ceiling = matmul_ceiling(ceiling_n, device=device)
    report: dict[str, Any] = {
        "matmul_gflops": ceiling,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "hf": with_hf,
        "shapes": {},
    }
    choices: dict[str, str] = {}
    for name, shape in shapes.items():
        compile_auto: dict[str, Any] = {}
        print(f"{name}: loss curves", file=sys.stderr)
        curves = loss_curves(
            shape, loss_steps.get(name, 4), precisions=precisions, with_hf=with_hf, device=device
        )
        print(f"{name}: speed", file=sys.stderr)
        rows = speed(
            shape,
            precisions=precisions,
            steps=steps.get(name, 1),
            repeats=repeats,
            compile=compile,
            with_hf=with_hf,
            ceiling=ceiling,
            ceiling_n=ceiling_n,
            choices=choices,
            compile_auto=compile_auto,
            device=device,
        )
        report["shapes"][name] = {
            "shape": shape.__dict__,
            "flops_per_token": shape.flops_per_token(),
            "rows": rows,
            "compile_auto": compile_auto,
            "loss_curves": curves,
            "max_loss_gap_to_hf": {
                p: max(abs(a - b) for a, b in zip(c["tformer"], c["hf-gpt2"], strict=True))
                for p, c in curves.items()
                if "hf-gpt2" in c
            },
        }
    report.update(machine_facts(choices, device))
    write_outputs(out, "train", report, markdown, plot)
    return report


def markdown(report: dict[str, Any]) -> str:
    c = report["matmul_gflops"]
    where = (
        f"on the GPU ({report['gpu']['name']}): {c['float32']:.0f} GFLOP/s float32, {c['bfloat16']:.0f} "
        "GFLOP/s bfloat16 (torch.matmul, measured, not the datasheet's)"
        if "gpu" in report
        else f"here: {c['float32']:.0f} GFLOP/s float32, {c['bfloat16']:.0f} GFLOP/s bfloat16 (the faster "
        f"of torch.matmul and oneDNN; torch.matmul gave {c.get('float32_matmul', c['float32']):.0f} / "
        f"{c.get('bfloat16_matmul', c['bfloat16']):.0f})"
    )
    lines = [
        f"Training step (forward, cross-entropy, backward, AdamW); torch {report['torch']}, "
        f"{report['threads']} threads. Matmul ceiling {where} at the start; "
        "measured again after every round of timings, it moves, so MFU = model FLOPs (6N + 12LCT per token) "
        "/ time / the median ceiling of the same precision over the run (given per table). Medians of "
        "interleaved repeats.",
        "",
        machine_line(report),
        "",
    ]
    for name, s in report["shapes"].items():
        sh = s["shape"]
        lines += [
            f"**{name}**: {sh['n_layers']} layers, {sh['n_heads']} heads, d_model {sh['d_model']}, "
            f"vocabulary {sh['vocab_size']}, batch {sh['batch']} x {sh['block']} tokens",
            "",
            "| model | precision | ms / step | steps / s | tokens / s | MFU | vs HF (same precision) |",
            "|---|---|---|---|---|---|---|",
        ]
        hf = {r["precision"]: r["steps_per_s"] for r in s["rows"] if r["model"] == "hf-gpt2"}
        peaks = {r["precision"]: r for r in s["rows"] if "ceilings_gflops" in r}
        for r in s["rows"]:
            ratio = f"{r['steps_per_s'] / hf[r['precision']]:.2f}x" if r["precision"] in hf else "n/a"
            lines.append(
                f"| {r['model']} | {r['precision']} | {1000 * r['seconds_per_step']:.1f} | "
                f"{r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.0f}% | {ratio} |"
            )
        for p, choice in s.get("compile_auto", {}).items():
            kind = "compiled" if choice["compiled"] else "eager"
            lines.append(
                f"\nThe tformer row, {p}: accel's kernels and {kind} steps, what train.compile = auto takes "
                f"for a run of 10 minutes or more ({choice['why']})."
            )
        for p, r in peaks.items():
            lo, hi = min(r["ceilings_gflops"]), max(r["ceilings_gflops"])
            lines.append(f"\nCeiling for {p}: median {r['ceiling_gflops']:.0f} GFLOP/s ({lo:.0f}-{hi:.0f}).")
        for p, curves in s["loss_curves"].items():
            first = ", ".join(f"{m} {v[0]:.3f} -> {v[-1]:.3f}" for m, v in curves.items())
            gap = s["max_loss_gap_to_hf"].get(p)
            gap_text = f"; largest |tformer - HF| gap {gap:.2e}" if gap is not None else ""
            lines.append(
                f"\nLoss over the first {len(next(iter(curves.values())))} steps, {p}: {first}{gap_text}"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    names = list(report["shapes"])
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 8), squeeze=False)
    for j, name in enumerate(names):
        s = report["shapes"][name]
        ax = axes[0][j]
        labels = [f"{r['model']}\n{r['precision']}" for r in s["rows"]]
        ax.bar(range(len(labels)), [r["tokens_per_s"] for r in s["rows"]], color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("training tokens / s")
        ax.set_title(name)
        ax = axes[1][j]
        for p, curves in s["loss_curves"].items():
            for m, v in curves.items():
                ax.plot(range(1, len(v) + 1), v, "-" if p == "fp32" else "--", label=f"{m} {p}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli(args: argparse.Namespace) -> int:
    """`tformer bench train` (options from tformer.bench.add_cli_options)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = bench_device(args.device)
    table = GPU_SHAPES if device.type == "cuda" else SHAPES
    names = [s for s in args.shapes.split(",") if s] if args.shapes else list(DEFAULT_SHAPES[device.type])
    unknown = [s for s in names if s not in table]
    if unknown:
        raise ValueError(f"unknown shape {unknown[0]!r}; expected one of {', '.join(table)}")
    out = args.out or "runs/bench-train"
    report = run(
        shapes={s: table[s] for s in names},
        precisions=tuple(p for p in (args.precisions or "fp32,bf16").split(",") if p),
        steps=None if args.steps is None else dict.fromkeys(names, args.steps),
        loss_steps=None if args.loss_steps is None else dict.fromkeys(names, args.loss_steps),
        repeats=args.repeats,
        compile=not args.no_compile,
        out_dir=out,
        device=device,
    )
    print(markdown(report))
    print(f"written: {out}/train.json, train.md, train.png")
    return 0
