"""Training-step time: tformer's Seq2Seq against torch.nn.Transformer of the same shape and weights.

Both models get the same embeddings, sinusoidal positions and tied output projection; only the stacks
differ (tformer's layers vs nn.Transformer's). Each step is forward + label-smoothed cross-entropy +
backward + Adam. The two are timed interleaved (A B A B ...) and the medians compared, so machine drift
hits both alike.

    .venv/bin/python benchmarks/bench_step.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

from tformer.attention import causal_mask
from tformer.config import Seq2SeqConfig
from tformer.models import Seq2Seq

SHAPES = {
    # the demo's model at its batch size
    "small (3+3 layers, d_model 128, 4 heads, d_ff 512; 128 x 20 tokens)": dict(
        config=dict(d_model=128, n_heads=4, d_ff=512, n_layers=3), batch=128, src_len=20, tgt_len=20
    ),
    # the paper's base model at a batch that fits 2 cores in about a second
    "paper base (6+6 layers, d_model 512, 8 heads, d_ff 2048; 16 x 32 tokens)": dict(
        config=dict(d_model=512, n_heads=8, d_ff=2048, n_layers=6), batch=16, src_len=32, tgt_len=32
    ),
}
VOCAB = 8000


class TorchReference(nn.Module):
    """nn.Transformer wrapped with the same embedding, positions and output projection as tformer."""

    def __init__(self, ours: Seq2Seq) -> None:
        super().__init__()
        c = ours.config
        self.ours_embed = ours  # shares src/tgt embedding, positions and output projection
        self.transformer = nn.Transformer(
            c.d_model,
            c.n_heads,
            c.n_layers,
            c.decoder_layers,
            c.d_ff,
            dropout=c.dropout,
            batch_first=True,
            norm_first=c.norm_first,
        )
        copy_stacks(ours, self.transformer)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        m = self.ours_embed
        pad = src == 0
        x = m.encoder.dropout(m.encoder.positions(m.src_embed(src)))
        y = m.decoder.dropout(m.decoder.positions(m.tgt_embed(tgt)))
        t = tgt.shape[1]
        h = self.transformer(
            x,
            y,
            tgt_mask=~causal_mask(t),
            src_key_padding_mask=pad,
            memory_key_padding_mask=pad,
            tgt_is_causal=True,
        )
        return m.output(h)


def copy_stacks(ours: Seq2Seq, ref: nn.Transformer) -> None:
    with torch.no_grad():
        for mine, theirs in [
            *zip(ours.encoder.layers, ref.encoder.layers, strict=True),
            *zip(ours.decoder.layers, ref.decoder.layers, strict=True),
        ]:
            pairs = [(mine.self_attn, theirs.self_attn)]
            if hasattr(theirs, "multihead_attn"):
                pairs.append((mine.cross_attn, theirs.multihead_attn))
            for a, b in pairs:
                weight, bias = a.in_projection()
                b.in_proj_weight.copy_(weight)
                b.in_proj_bias.copy_(bias)
                b.out_proj.load_state_dict(a.out_proj.state_dict())
            theirs.linear1.load_state_dict(mine.ff.linear1.state_dict())
            theirs.linear2.load_state_dict(mine.ff.linear2.state_dict())
            for i in (1, 2, 3):
                if hasattr(theirs, f"norm{i}"):
                    getattr(theirs, f"norm{i}").load_state_dict(getattr(mine, f"norm{i}").state_dict())
        ref.encoder.norm.load_state_dict(ours.encoder.norm.state_dict())
        ref.decoder.norm.load_state_dict(ours.decoder.norm.state_dict())


def make_step(model: nn.Module, forward, src, tgt_in, tgt_out):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)

    def step() -> float:
        t0 = time.perf_counter()
        logits = forward(src, tgt_in)
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=0, label_smoothing=0.1
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def bench_shape(name: str, spec: dict, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    config = Seq2SeqConfig(
        src_vocab_size=VOCAB,
        tgt_vocab_size=VOCAB,
        share_embeddings=True,
        final_norm=True,
        dropout=0.1,
        max_seq_len=128,
        attention="sdpa",
        **spec["config"],
    )
    ours = Seq2Seq(config)
    ref = TorchReference(ours)
    b, s, t = spec["batch"], spec["src_len"], spec["tgt_len"]
    src = torch.randint(4, VOCAB, (b, s))
    src[: b // 4, s // 2 :] = 0  # a quarter of the batch padded to half length
    tgt = torch.randint(4, VOCAB, (b, t + 1))
    # Same weights, same function: check in eval mode before timing.
    ours.eval(), ref.eval()
    with torch.no_grad():
        diff = (ours(src, tgt[:, :-1]).logits - ref(src, tgt[:, :-1])).abs().max().item()
    ours.train(), ref.train()
    # Separate copies so each optimiser updates its own weights.
    ref_model = TorchReference(Seq2Seq(config))
    ref_model.ours_embed.load_state_dict(ours.state_dict())
    copy_stacks(ref_model.ours_embed, ref_model.transformer)
    ref_model.train()
    steps = {
        "tformer": make_step(ours, lambda x, y: ours(x, y).logits, src, tgt[:, :-1], tgt[:, 1:]),
        "torch.nn.Transformer": make_step(ref_model, ref_model, src, tgt[:, :-1], tgt[:, 1:]),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    for _ in range(repeats):
        for k, fn in steps.items():
            times[k].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": name,
        "tokens_per_step": b * (s + t),
        "max_abs_logit_diff": diff,
        "median_s": med,
        "all_s": times,
        "ratio_ref_over_tformer": med["torch.nn.Transformer"] / med["tformer"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    results = [bench_shape(n, s, args.repeats, args.warmup) for n, s in SHAPES.items()]
    print(f"machine: {machine}; median of {args.repeats} steps after {args.warmup} warm-up, interleaved\n")
    print("| shape | tformer step | nn.Transformer step | nn.Transformer / tformer | max logit diff |")
    print("|---|---|---|---|---|")
    for r in results:
        m = r["median_s"]
        print(
            f"| {r['shape']} | {1000 * m['tformer']:.0f} ms | {1000 * m['torch.nn.Transformer']:.0f} ms "
            f"| {r['ratio_ref_over_tformer']:.2f}x | {r['max_abs_logit_diff']:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
