"""Tiny Shakespeare's training step, tformer against nanoGPT, interleaved in one process on the same batches:
tformer eager and compiled (what `train.compile = true` runs) against nanoGPT's documented CPU step.

    .venv/bin/python benchmarks/nanogpt_step_ab.py /path/to/nanoGPT [--rounds 16] [--no-compile] [key=value ...]

Both models take their shape from configs/shakespeare_char.toml (overrides as `model.positions=learned`,
tformer's exact copy of nanoGPT's architecture) and the vocabulary of the character tokenizer; nanoGPT's
`model.py` comes from its checkout (not part of this repository). Each step is what the trainers do:
forward, loss, backward, clipping at train.clip_norm, AdamW (nanoGPT: its `configure_optimizers`, which
on a CPU takes the foreach kernel; tformer: its trainer's `make_optimizer`, fused, and the summed loss
scaled per token as the trainer scales it), gradients cleared. Random windows of the text, the same for
both. The rows are timed in rotating order, `--steps` steps a round; prints each row's median and
nanoGPT's time over it (the step speed-up; `benchmarks/shakespeare.py` times the whole runs, with
evaluation). The compiled row pays its compilation before the timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("nanogpt", help="nanoGPT checkout (its model.py is imported)")
    parser.add_argument("--config", default="configs/shakespeare_char.toml")
    parser.add_argument("--rounds", type=int, default=16, help="timed rounds per row (default 16)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round (default 10)")
    parser.add_argument("--no-compile", action="store_true", help="no compiled tformer row")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_intermixed_args()
    model_py = Path(args.nanogpt) / "model.py"
    if not model_py.exists():
        print(f"skipping: {model_py} not found (a nanoGPT checkout is needed)")
        return 0

    import torch
    import torch.nn.functional as F

    from tformer import accel
    from tformer.accel.tune import fingerprint
    from tformer.config.loading import apply_overrides, load_toml
    from tformer.data.tokenizers import Tokenizer
    from tformer.models import LanguageModel
    from tformer.training.step import make_optimizer, scaled_clipped_norm

    config = apply_overrides(load_toml(args.config), args.overrides)
    text_path = Path(config.data.paths("train")[0])
    if not text_path.exists():
        print(f"skipping: {text_path} not found; set TFORMER_DATA to the shared data folder")
        return 0
    sys.path.insert(0, str(Path(args.nanogpt)))
    from model import GPT, GPTConfig  # nanoGPT's, from its checkout

    text = text_path.read_text(encoding="utf-8")
    tok = Tokenizer.train([text], kind="char")
    m, t = config.model.replace(vocab_size=tok.vocab_size), config.train
    assert t.batch_size is not None, "the config needs train.batch_size"
    block, vocab = m.max_seq_len, tok.vocab_size
    ids = torch.tensor(tok.encode(text[: len(text) * 9 // 10]), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(len(ids) - block - 1, (64, t.batch_size), generator=g)
    windows = torch.stack([torch.stack([ids[s : s + block + 1] for s in row]) for row in starts])
    xs, ys = windows[:, :, :-1].contiguous(), windows[:, :, 1:].contiguous()

    torch.manual_seed(0)
    nano = GPT(
        GPTConfig(
            block_size=block,
            vocab_size=vocab,
            n_layer=m.n_layers,
            n_head=m.n_heads,
            n_embd=m.d_model,
            dropout=m.dropout,
            bias=m.bias,
        )
    )
    nano_opt = nano.configure_optimizers(t.weight_decay, t.lr, tuple(t.betas), "cpu")

    def nano_step(i: int) -> None:
        _, loss = nano(xs[i % len(xs)], ys[i % len(ys)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nano.parameters(), t.clip_norm)
        nano_opt.step()
        nano_opt.zero_grad(set_to_none=True)

    def tformer_step(compiled: bool) -> Callable[[int], None]:
        torch.manual_seed(0)
        lm = accel.apply(LanguageModel(m)).train()
        if compiled:
            lm.compile()  # as train.compile = true does (training/compiling.py)
        opt = make_optimizer(lm, t, t.lr)

        def step(i: int) -> None:
            y = ys[i % len(ys)]
            logits = lm(xs[i % len(xs)]).logits
            F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum").backward()
            scaled_clipped_norm(lm, 1.0 / y.numel(), t.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    steps = {"nanoGPT": nano_step, "tformer (eager)": tformer_step(False)}
    if not args.no_compile:
        steps["tformer (compiled)"] = tformer_step(True)
    for name, step in steps.items():
        t0 = time.perf_counter()
        for i in range(3):
            step(i)
        print(f"{name}: first 3 steps {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for i in range(args.steps):
                steps[name](r * args.steps + i)
            times[name].append((time.perf_counter() - t0) / args.steps * 1000)
    fp = fingerprint()
    print(f"{fp['cpu']}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.rounds} rounds")
    base = statistics.median(times["nanoGPT"])
    for name, ms in times.items():
        med = statistics.median(ms)
        print(
            f"{name:20s} {med:7.1f} ms a step ({min(ms):.1f}-{max(ms):.1f}), nanoGPT / this {base / med:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
