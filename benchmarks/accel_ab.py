"""One model's training step with and without tformer.accel, alternating in one process: the paired A/B
that `tformer bench train`'s separate rows cannot give on a noisy machine.

    .venv/bin/python benchmarks/accel_ab.py [--shape gpt2-small|baby|multi30k] [--precision fp32]
        [--steps 6]

The same model, optimiser and batches; each round takes one step with accel's paths and one under
`accel.reverted` (stock PyTorch), the order alternating per round, after one warm-up step of each.
Prints the median seconds per step of each and their ratio. gpt2-small and baby: `bench train`'s
LanguageModel and batches. multi30k: configs/multi30k_de_en.toml's Seq2Seq (d_model 256, 3 + 3 layers,
8000-token shared vocabulary, dropout 0.1, label smoothing 0.1) on random token batches of about 3,000
tokens whose (batch, source length, target length) differs every step, as length-bucketed batches do:
what a new shape costs (oneDNN's bfloat16 kernel builds, decision 76) is part of every step.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tformer.allocator import reuse_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="gpt2-small", choices=("gpt2-small", "baby", "multi30k"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each (default 6)")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line trains (before any big tensor)

    import torch

    from tformer import accel
    from tformer.accel.tune import fingerprint
    from tformer.bench.train import SHAPES, _batches, _lm_logits, _Runner
    from tformer.models.lm import LanguageModel

    if args.shape == "multi30k":
        lm, fast, stock = _seq2seq_runners()
    else:
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


class _Seq2SeqRunner:
    """Steps of one Seq2Seq on batches of a new (B, S, T) each call, with or without accel's paths."""

    def __init__(self, name: str, model, opt, shapes, stock: bool) -> None:
        self.name, self.model, self.opt, self.shapes, self.stock = name, model, opt, shapes, stock

    def step(self, precision: str):
        import contextlib

        import torch

        from tformer import accel
        from tformer.training.losses import sequence_cross_entropy

        b, s, t = next(self.shapes)
        g = torch.Generator().manual_seed(b * 10_000 + s * 100 + t)
        src, tgt = (
            torch.randint(4, 8000, (b, s), generator=g),
            torch.randint(4, 8000, (b, t + 1), generator=g),
        )
        paths = accel.reverted(self.model) if self.stock else contextlib.nullcontext()
        with paths, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = self.model(src, tgt[:, :-1]).logits
            loss = sequence_cross_entropy(logits, tgt[:, 1:], pad_id=0, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def _seq2seq_runners():
    """The Multi30k model, one optimiser, and one stream of never-repeated batch shapes for both runners."""
    import random

    import torch

    from tformer import accel
    from tformer.config import Seq2SeqConfig
    from tformer.models import Seq2Seq

    config = Seq2SeqConfig(
        d_model=256, n_heads=8, d_ff=1024, n_layers=3, dropout=0.1, max_seq_len=128, src_vocab_size=8000,
        tgt_vocab_size=8000, share_embeddings=True, tie_output=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = accel.apply(Seq2Seq(config)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def shapes():
        rnd, seen = random.Random(0), set()
        while True:
            s = rnd.randint(6, 40)
            shape = (3000 // (2 * s) + rnd.randint(-5, 5), s, max(4, s + rnd.randint(-3, 3)))
            if shape not in seen:
                seen.add(shape)
                yield shape

    stream = shapes()
    return (
        model,
        _Seq2SeqRunner("accel", model, opt, stream, False),
        _Seq2SeqRunner("stock", model, opt, stream, True),
    )


if __name__ == "__main__":
    main()
