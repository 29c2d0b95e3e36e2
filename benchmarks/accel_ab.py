"""One model's training step with and without tformer.accel, alternating in one process: the paired A/B
that `tformer bench train`'s separate rows cannot give on a noisy machine.

    .venv/bin/python benchmarks/accel_ab.py [--shape gpt2-small] [--precision fp32] [--steps 6]

The same LanguageModel, optimiser and batches (`bench train`'s); each round takes one step with accel's
paths and one under `accel.reverted` (stock PyTorch), the order alternating per round, after one warm-up
step of each. Prints the median seconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tformer.allocator import reuse_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="gpt2-small")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each (default 6)")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line trains (before any big tensor)

    import torch

    from tformer import accel
    from tformer.accel.tune import fingerprint
    from tformer.bench.train import SHAPES, _batches, _lm_logits, _Runner
    from tformer.models.lm import LanguageModel

    shape = SHAPES[args.shape]
    batches = _batches(shape, 16, 7)
    torch.manual_seed(0)
    lm = accel.apply(LanguageModel(shape.lm_config()))
    fast = _Runner("accel", lm, _lm_logits(lm), batches)
    stock = _Runner("stock", lm, _lm_logits(lm), batches, stock=True)
    stock.opt = fast.opt  # one model, one optimiser: only the paths differ
    times: dict[str, list[float]] = {"accel": [], "stock": []}
    for runner in (fast, stock):
        runner.step(args.precision)
    for i in range(args.steps):
        for runner in (fast, stock) if i % 2 == 0 else (stock, fast):
            start = time.perf_counter()
            float(runner.step(args.precision))  # the loss read: the step is finished
            times[runner.name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{fingerprint()['cpu']}, {torch.get_num_threads()} threads; {args.shape} {args.precision}")
    for name, values in times.items():
        print(f"  {name}: median {med[name]:.3f} s/step ({min(values):.3f}-{max(values):.3f})")
    print(f"  stock / accel: {med['stock'] / med['accel']:.3f}x; choices: {accel.recorded(lm)}")


if __name__ == "__main__":
    main()
