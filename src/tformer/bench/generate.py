"""`tformer bench generate`: greedy generation speed at GPT-2-small shape, batch 1 and 8.

Rows: tformer's `generate` (its model with tformer.accel's kernels, as the command line loads it, by
default: compiled one-row kernels where this machine measured them faster) with the static KV cache and
without a cache (re-reading the whole context each step); with the cache but without tformer.accel's
kernels ("stock": what TFORMER_ACCEL=off gives); with the cache and `compile=True`: compiled
matrix-vector kernels for every shape (tformer.accel.linear) and, at batch 1, the whole decoding step
compiled as one graph (accel/decode_graph.py), both measured for the default row, which takes what
measured faster (the graph where it is compiled in the process, as it is after the compiled row; the
"steps as" column says which); and Hugging Face
`GPT2LMHeadModel.generate()` on the same weights (a seeded random GPT-2, copied
into tformer's LanguageModel: same architecture, GELU with tanh as GPT-2's "gelu_new"). Both generate
exactly `new_tokens` tokens after the same prompt (no EOS), so their outputs must be the same tokens;
the report says whether they are.

The floor: each decoding step reads every weight once, so tokens/s can be at most
batch x copy bandwidth / weight bytes. Bandwidth is measured in the same run, a 512 MiB tensor copy after
each timed generation, and each row's floor uses the copies made among its own timings. Two rates are set
against it: tokens/s of the whole generation (the prompt's pass included, as a user sees it), and the
decoding steps alone, timed as the difference between generating all `new_tokens` and only the first one
(the prompt's pass of `prompt_len` rows is compute-bound work, which the weight-streaming floor does not
describe; at GPT-2-small shape it takes about as long as three decoding steps).
Precisions: float32, bfloat16 (weights converted) and int8 (tformer only: its linear layers quantised by
torchao as `--precision int8` does, dynamic int8 activations; the tied output projection gets its own
int8 copy, the embedding table stays float32). Hugging Face rows are float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tformer import accel
from tformer.bench.common import (
    CopyProbe,
    GPTShape,
    bench_device,
    gpt2_into_lm,
    hf_gpt2,
    machine_facts,
    machine_line,
    pyplot,
    require_transformers,
    synchronize,
    write_outputs,
)
from tformer.inference.sampling import generate
from tformer.models.lm import LanguageModel

SHAPE = GPTShape(n_layers=12, n_heads=12, d_model=768, vocab_size=50257, block=1024, batch=1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISIONS = ("fp32", "bf16", "int8")
SEED = 0
COMPILED = "tformer (KV cache, compiled)"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter read by a decoding step (tied matrices once; the position table counted
    whole, an overestimate of one row that keeps the floor conservative)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes a decoding step reads once `model` (float32) has its nn.Linear weights in int8: one byte per
    weight plus a float32 scale per output row; everything else (embeddings, norms, biases) float32."""
    linear = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    int8 = sum(w.numel() + 4 * w.shape[0] for w in linear.values())
    rest = sum(4 * p.numel() for p in model.parameters() if id(p) not in linear)
    return int8 + rest


def _variants(
    lm: LanguageModel, hf: nn.Module | None, *, compiled: bool = True
) -> dict[str, Callable[[Tensor, int], Tensor]]:
    """Each variant: (prompt, number of new tokens) -> the prompt and the tokens generated after it.
    `compiled`: with the compiled-kernel row (CPU only: the kernels are CPU ones)."""
    out: dict[str, Callable[[Tensor, int], Tensor]] = {
        "tformer (KV cache)": lambda p, n: generate(lm, p, max_new_tokens=n, greedy=True),
        "tformer (no cache)": lambda p, n: generate(lm, p, max_new_tokens=n, greedy=True, use_cache=False),
    }
    if accel.mode() != "off":

        def stock(p: Tensor, n: int) -> Tensor:  # what tformer.accel's paths are worth
            with accel.reverted(lm):
                return generate(lm, p, max_new_tokens=n, greedy=True)

        out["tformer (KV cache, stock)"] = stock
    if accel.mode() != "off" and compiled:
        out[COMPILED] = lambda p, n: generate(  # float32, bfloat16, int8 kernels
            lm, p, max_new_tokens=n, greedy=True, compile=True
        )
    if hf is not None:
        gen: Any = hf.generate

        def hf_generate(p: Tensor, n: int) -> Tensor:
            return gen(
                input_ids=p,
                attention_mask=torch.ones_like(p),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

        out["hf generate()"] = hf_generate
    return out


def _how(lm: LanguageModel, variant: str, batch: int, new_tokens: int) -> str | None:
    """How a row's decoding steps ran: "graph" (the whole step compiled as one graph,
    accel/decode_graph.py), "kernels" (op by op, with tformer.accel's kernels), "stock" (without them),
    "uncached" (the whole context every step); None for Hugging Face's."""
    if variant == "hf generate()":
        return None
    if variant == "tformer (no cache)":
        return "uncached"
    if variant == "tformer (KV cache, stock)" or accel.mode() == "off":
        return "stock"
    compile = True if variant == COMPILED else None
    return "graph" if accel.decoding_graph(lm, compile, batch, new_tokens) is not None else "kernels"


def run(
    *,
    shape: GPTShape = SHAPE,
    batches: tuple[int, ...] = (1, 8),
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    prompt_len: int = 32,
    new_tokens: int = 32,
    repeats: int = 3,
    out_dir: str | Path = "runs/bench-generate",
    bandwidth_mib: int = 512,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Measure every (precision, batch, variant); write generate.json, .md and .png under `out_dir`.
    `device`: cpu (the default) or a CUDA GPU (float32 and bfloat16; the floor from the GPU memory's own
    copy bandwidth; every timing from an idle device to the end of its kernels)."""
    device = torch.device("cpu") if device is None else device
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; expected one of {', '.join(PRECISIONS)}")
        if p == "int8" and device.type != "cpu":
            raise ValueError("precision int8 is CPU-only (torchao's CPU kernels); on a GPU: fp32, bf16")
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be >= 2 (decoding steps are timed as the difference), got {new_tokens}"
        )
    if prompt_len + new_tokens > shape.block:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} > context {shape.block}")
    try:
        require_transformers()
        with_hf = True
    except RuntimeError as exc:
        print(f"{exc}: no Hugging Face rows", file=sys.stderr)
        with_hf = False
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe = CopyProbe(bandwidth_mib, device)
    bandwidths: list[float] = []  # one copy per round of timings, between the variants' runs
    hf32 = hf_gpt2(shape, SEED).eval() if with_hf else None
    torch.manual_seed(SEED)
    lm32 = LanguageModel(shape.lm_config()).eval()
    if hf32 is not None:
        gpt2_into_lm(hf32, lm32)
        hf32 = hf32.to(device)
    lm32 = lm32.to(device)
    g = torch.Generator().manual_seed(SEED + 1)
    prompts = {b: torch.randint(shape.vocab_size, (b, prompt_len), generator=g).to(device) for b in batches}
    rows = []
    choices: dict[str, str] = {}  # the kernel tformer's models took per shape class (for the report)
    hf_fp32_tokens: dict[int, Tensor] = {}
    for precision in precisions:
        if precision == "int8":
            from tformer.inference.precision import apply_precision

            wbytes = int8_weight_bytes(lm32)
            lm, hf = apply_precision(copy.deepcopy(lm32), "int8"), None
        else:
            dtype = DTYPES[precision]
            lm = lm32 if dtype == torch.float32 else copy.deepcopy(lm32).to(dtype)
            hf = None if hf32 is None else hf32 if dtype == torch.float32 else copy.deepcopy(hf32).to(dtype)
            wbytes = weight_bytes(lm)
        variants = _variants(accel.apply(lm), hf, compiled=device.type == "cpu")
        for b in batches:
            prompt = prompts[b]
            # warm-up and tokens; the compiled row first: it measures the compiled kernels against the
            # eager ones where this machine has no verdict yet, which the default row then follows
            order = sorted(variants, key=lambda name: name != COMPILED)
            outputs = {name: variants[name](prompt, new_tokens) for name in order}
            times: dict[str, list[float]] = {name: [] for name in variants}
            steps: dict[str, list[float]] = {name: [] for name in variants}
            copies: list[float] = []
            reads: list[float] = []
            for _ in range(repeats):
                for name, fn in variants.items():
                    synchronize(device)
                    t0 = time.perf_counter()
                    fn(prompt, new_tokens)
                    synchronize(device)
                    t1 = time.perf_counter()
                    fn(prompt, 1)  # the prompt's pass and the first token only
                    synchronize(device)
                    t2 = time.perf_counter()
                    times[name].append(t1 - t0)
                    # one decoding step (B new tokens): the rest of the generation, without the prompt's
                    # pass (a compute-bound product of prompt_len rows, not a weight-streaming step)
                    steps[name].append((t1 - t0 - (t2 - t1)) / (new_tokens - 1))
                    copies.append(probe.gbs())
                    reads.append(probe.read_gbs())
            # The floor from the bandwidth measured between these very timings: this machine's copy
            # bandwidth has been seen to move between 46 and 79 GB/s from one process or hour to another.
            bandwidth, read = statistics.median(copies), statistics.median(reads)
            bandwidths += copies
            floor = b * bandwidth * 1e9 / wbytes
            read_floor = b * read * 1e9 / wbytes  # the same bound from a read-only stream
            # int8 has no HF row: compare its tokens with HF's float32 ones (equal unless a near-tie flips)
            reference = outputs.get("hf generate()", hf_fp32_tokens.get(b))
            if precision == "fp32" and reference is not None:
                hf_fp32_tokens[b] = reference
            for name in variants:
                sec = statistics.median(times[name])
                tps = b * new_tokens / sec
                # no step (None) where timing noise exceeds the difference (tiny shapes)
                median_step = statistics.median(steps[name])
                step = median_step if median_step > 0 else None
                step_rate = b / median_step if median_step > 0 else None
                same = None if reference is None else bool(torch.equal(outputs[name], reference))
                how = _how(lm, name, b, new_tokens)
                rows.append(
                    {
                        "variant": name,
                        "precision": precision,
                        "batch": b,
                        "seconds": sec,
                        "tokens_per_s": tps,
                        "copy_bandwidth_gbs": bandwidth,
                        "floor_tokens_per_s": floor,
                        "fraction_of_floor": tps / floor,
                        "read_bandwidth_gbs": read,
                        "fraction_of_read_floor": tps / read_floor,
                        "decode_step_seconds": step,
                        "decode_fraction_of_floor": None if step_rate is None else step_rate / floor,
                        "decode_fraction_of_read_floor": None
                        if step_rate is None
                        else step_rate / read_floor,
                        "same_tokens_as_hf": same,
                        "decoding": how,
                        "all_seconds": times[name],
                    }
                )
                print(
                    f"  {precision} B={b} {name:20s} {tps:8.1f} tok/s ({tps / floor:.0%} of floor, "
                    f"{tps / read_floor:.0%} of the read floor)"
                    + (
                        ""
                        if step_rate is None
                        else f"; decoding steps {median_step * 1e3:.2f} ms ({step_rate / floor:.0%} of floor, "
                        f"{step_rate / read_floor:.0%} of the read floor)"
                    ),
                    file=sys.stderr,
                )
        choices.update(accel.recorded(lm) or {})
        del lm, hf, variants
        gc.collect()
    report = {
        "shape": shape.__dict__,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "copy_bandwidth_gbs": statistics.median(bandwidths),
        "copy_bandwidth_range_gbs": [min(bandwidths), max(bandwidths)],
        "weight_bytes_fp32": weight_bytes(lm32),
        "hf": with_hf,
        "int8": "tformer only (torchao dynamic int8 linear layers, the tied output projection with its "
        "own int8 copy; 'compiled' reads each int8 weight once, tformer.accel.linear); its tokens are compared "
        "with HF's float32 ones",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
        **machine_facts(choices, device),
    }
    write_outputs(out, "generate", report, markdown, plot)
    return report


def markdown(report: dict[str, Any]) -> str:
    s = report["shape"]
    lo, hi = report["copy_bandwidth_range_gbs"]
    lines = [
        f"Greedy generation, {s['n_layers']} layers, {s['n_heads']} heads, d_model {s['d_model']}, "
        f"vocabulary {s['vocab_size']}; prompt {report['prompt_len']} tokens, {report['new_tokens']} new "
        f"tokens; torch {report['torch']}, {report['threads']} threads. Copy bandwidth "
        f"{'of the GPU memory' if 'gpu' in report else 'here'}, measured "
        f"after each timed generation: median {report['copy_bandwidth_gbs']:.1f} GB/s (from "
        f"{lo:.1f} to {hi:.1f}); weights {report['weight_bytes_fp32'] / 2**20:.0f} MiB in float32. Floor = "
        "batch x bandwidth / weight bytes (every weight read once per step), with the bandwidth measured "
        "among that row's own timings; the read floor uses a sum over the same tensor (read only, as a "
        "decoding step reads) instead of the copy. Tokens/s count the whole generation, the prompt's pass "
        "included; a decoding step is timed as the difference between generating all the new tokens and "
        "only the first (which includes the prompt's pass), divided by one fewer, and set against the "
        "same floor. Medians of interleaved repeats. int8: " + report["int8"] + ".",
        "",
        machine_line(report),
        "",
        "| precision | batch | variant | tokens / s | of the floor | of the read floor | vs HF generate() "
        "| decoding step | of the floor (steps) | of the read floor (steps) | steps as | same tokens as HF |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    hf = {
        (r["precision"], r["batch"]): r["tokens_per_s"]
        for r in report["rows"]
        if r["variant"] == "hf generate()"
    }
    for r in report["rows"]:
        key = (r["precision"], r["batch"])
        if r["precision"] == "int8":
            key = ("fp32", r["batch"])  # against HF's float32 generate()
        ratio = f"{r['tokens_per_s'] / hf[key]:.2f}x" if key in hf else "n/a"
        same = {None: "n/a", True: "yes", False: "no"}[r["same_tokens_as_hf"]]
        lines.append(
            f"| {r['precision']} | {r['batch']} | {r['variant']} | {r['tokens_per_s']:.1f} | "
            f"{100 * r['fraction_of_floor']:.0f}% | {100 * r['fraction_of_read_floor']:.0f}% | {ratio} | "
            + (
                "n/a | n/a | n/a"
                if r["decode_step_seconds"] is None
                else f"{1e3 * r['decode_step_seconds']:.2f} ms | {100 * r['decode_fraction_of_floor']:.0f}% | "
                f"{100 * r['decode_fraction_of_read_floor']:.0f}%"
            )
            + f" | {r.get('decoding') or 'n/a'} | {same} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    groups = sorted({(r["precision"], r["batch"]) for r in report["rows"]})
    variants = list(dict.fromkeys(r["variant"] for r in report["rows"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (len(variants) + 1)
    for i, v in enumerate(variants):
        vals = [
            next(
                (
                    r["tokens_per_s"]
                    for r in report["rows"]
                    if r["variant"] == v and (r["precision"], r["batch"]) == g
                ),
                0.0,
            )
            for g in groups
        ]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=v)
    floors = [
        next(r["floor_tokens_per_s"] for r in report["rows"] if (r["precision"], r["batch"]) == g)
        for g in groups
    ]
    ax.bar(
        [j + len(variants) * width for j in range(len(groups))],
        floors,
        width,
        label="bandwidth floor",
        color="grey",
    )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{p}, batch {b}" for p, b in groups])
    ax.set_ylabel("generated tokens / s")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli(args: argparse.Namespace) -> int:
    """`tformer bench generate` (options from tformer.bench.add_cli_options)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = bench_device(args.device)
    out = args.out or "runs/bench-generate"
    default = PRECISIONS if device.type == "cpu" else ("fp32", "bf16")
    report = run(
        batches=tuple(int(b) for b in args.batches.split(",") if b),
        precisions=tuple(p for p in (args.precisions or ",".join(default)).split(",") if p),
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        out_dir=out,
        device=device,
    )
    print(markdown(report))
    print(f"written: {out}/generate.json, generate.md, generate.png")
    return 0
