"""GPT-2 small's batch-1 decoding step three ways, alternating in one process: the whole step as one
compiled graph (accel/decode_graph.py, decision 111), step by step with tformer.accel's kernels, and
stock PyTorch (`accel.reverted`). The paired A/B that `tformer bench generate`'s rows cannot give on a
machine whose memory bandwidth moves by a factor of two from one minute to the next.

    .venv/bin/python benchmarks/decode_graph_ab.py [--precision fp32|bf16] [--rounds 9]

`bench generate`'s model (a seeded random GPT-2-small-shaped LanguageModel), prompt (32 tokens) and
greedy generation of 32 tokens. `generate(..., compile=True)` first: it measures the per-product kernels
and the graph on this machine (into the tuner's cache) and compiles the graph; then each round times one
generation of each way, in rotating order, plus a read of 512 MiB (the read floor: weight bytes / read
bandwidth). A decoding step is the difference between generating 32 tokens and 1, over 31. Prints the
median step of each way, its share of the read floor and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tformer import accel
from tformer.accel import decode_graph
from tformer.allocator import reuse_freed_memory
from tformer.bench.common import CopyProbe, machine_facts, machine_line
from tformer.bench.generate import SHAPE
from tformer.inference.sampling import generate
from tformer.models.lm import LanguageModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    args = parser.parse_args()
    reuse_freed_memory()
    torch.manual_seed(0)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    lm = accel.apply(LanguageModel(SHAPE.lm_config()).eval().to(dtype))
    prompt = torch.randint(SHAPE.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    tokens = generate(lm, prompt, max_new_tokens=32, greedy=True, compile=True)
    print(f"compile=True's first generation (measuring, compiling): {time.perf_counter() - start:.1f} s")
    record = accel.tuner().record(accel._graph_key(lm))
    if record is not None:
        print(f"the tuner's verdict (cached): the graph's step {record['ratio']:.3f}x the kernels'")

    def graph(n: int) -> torch.Tensor:
        assert accel.decoding_graph(lm, True, 1, n) is not None
        return generate(lm, prompt, max_new_tokens=n, greedy=True, compile=True)

    def kernels(n: int) -> torch.Tensor:  # the default's per-product kernels, the graph out of reach
        saved = decode_graph._graphs.pop(lm)
        try:
            return generate(lm, prompt, max_new_tokens=n, greedy=True)
        finally:
            decode_graph._graphs[lm] = saved

    def stock(n: int) -> torch.Tensor:
        with accel.reverted(lm):
            return generate(lm, prompt, max_new_tokens=n, greedy=True)

    ways = {"graph": graph, "kernels": kernels, "stock": stock}
    for name, fn in ways.items():
        same = torch.equal(fn(32), tokens)
        print(f"{name}: {'the same' if same else 'other'} tokens as compile=True's")
    probe = CopyProbe(512)
    steps: dict[str, list[float]] = {name: [] for name in ways}
    reads: list[float] = []
    names = list(ways)
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            t0 = time.perf_counter()
            ways[name](32)
            t1 = time.perf_counter()
            ways[name](1)
            t2 = time.perf_counter()
            steps[name].append((t1 - t0 - (t2 - t1)) / 31)
        reads.append(probe.read_gbs())
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    read = statistics.median(reads)
    floor = weight_bytes / (read * 1e9)
    print(machine_line(machine_facts(accel.recorded(lm))))
    print(f"{args.precision}, read bandwidth median {read:.1f} GB/s ({min(reads):.1f}-{max(reads):.1f}), "
          f"read floor {floor * 1e3:.2f} ms per step; {args.rounds} rounds")  # fmt: skip
    medians = {name: statistics.median(v) for name, v in steps.items()}
    for name, s in medians.items():
        print(f"  {name:8s} {s * 1e3:6.2f} ms  {floor / s:4.0%} of the read floor  "
              f"(range {min(steps[name]) * 1e3:.1f}-{max(steps[name]) * 1e3:.1f})")  # fmt: skip
    print(f"graph vs kernels {medians['kernels'] / medians['graph']:.2f}x, "
          f"graph vs stock {medians['stock'] / medians['graph']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
