"""The demo's training forward + backward with float32 attention through the fused kernel ("stock") and
through accel's three products ("short"), alternating on the demo's own batches in one process: the
paired A/B behind decision 112.

    .venv/bin/python benchmarks/attention_ab.py [--rounds 60]

One accel model (float32); each round takes one batch of the demo's first epoch both ways, the order
alternating. Prints what the tuner chose on first use and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="paired rounds (default 60)")
    args = parser.parse_args()

    import torch

    from tformer import accel
    from tformer.accel import attention as accel_attention
    from tformer.accel.tune import fingerprint
    from tformer.data.synthetic import number_translation
    from tformer.data.tokenizers import Tokenizer
    from tformer.demo import demo_size
    from tformer.models import Seq2Seq
    from tformer.tasks.translation import TranslationTask

    size = demo_size(False, 0)
    torch.manual_seed(0)
    splits = number_translation(size.n_train, size.n_valid, size.n_test, seed=0)
    pairs = {k: [(p.src, p.tgt) for p in v] for k, v in splits.items()}
    src_tok = Tokenizer.train([s for s, _ in pairs["train"]], kind="word")
    tgt_tok = Tokenizer.train([t for _, t in pairs["train"]], kind="word")
    config = size.model.replace(src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size)
    model = accel.apply(Seq2Seq(config)).train()
    train = size.train.replace(precision="fp32")
    task = TranslationTask(config, train, src_tok, tgt_tok, pairs["train"], pairs["valid"])
    batches = task.train_batches(0)
    plan = accel._plan_of(model)
    assert plan is not None
    classes = [f"attention/float32/train/keys<={c}" for c in accel_attention.FP32_KEY_CLASSES]

    def step(batch: object) -> None:
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).total.backward()

    step(batches[0])  # first use: the tuner times the classes it meets
    chose = {k: v for k, v in (accel.recorded(model) or {}).items() if k.startswith("attention")}
    times: dict[str, list[float]] = {"short": [], "stock": []}
    for i in range(args.rounds):
        batch = batches[(i * 7) % len(batches)]
        for path in ("short", "stock") if i % 2 else ("stock", "short"):
            plan.update(dict.fromkeys(classes, path))
            torch.manual_seed(i)
            start = time.perf_counter()
            step(batch)
            times[path].append(time.perf_counter() - start)
    med = {k: statistics.median(v[4:]) for k, v in times.items()}
    print(f"{fingerprint()['cpu']}, {torch.get_num_threads()} threads; the tuner chose {chose}")
    print(
        f"  short {med['short'] * 1e3:.1f} ms, stock {med['stock'] * 1e3:.1f} ms (medians of "
        f"{args.rounds - 4}); stock / short {med['stock'] / med['short']:.3f}x"
    )


if __name__ == "__main__":
    main()
