"""Claim: a Transformer trains in parallel over the sequence, where an RNN must step through time.

Measured: training time (forward + backward + optimizer step) per batch and per token against sequence
length for a causal Transformer language model and an LSTM language model of (nearly) equal parameter
count; and decoding time per generated token (KV cache / recurrent state) at each context length.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import TypedDict

import torch
import torch.nn.functional as F

from tformer import accel
from tformer.bench.common import median_seconds
from tformer.config import LMConfig
from tformer.experiments.common import Result, Table, line_plot, n_params
from tformer.models.lm import LanguageModel
from tformer.models.rnn import RNNLanguageModel

CLAIM = (
    "Self-attention computes all positions of a sequence at once, so a Transformer's training time grows "
    "more slowly with sequence length than an RNN's, which must take one step per position "
    "(Vaswani et al., 2017, section 4 and table 1)."
)


class Settings(TypedDict):
    lengths: list[int]
    d_model: int
    batch: int
    repeats: int
    decode_steps: int


SETTINGS: dict[str, Settings] = {
    "quick": {"lengths": [32, 64, 128], "d_model": 64, "batch": 4, "repeats": 2, "decode_steps": 8},
    "medium": {
        "lengths": [32, 64, 128, 256, 512],
        "d_model": 128,
        "batch": 8,
        "repeats": 3,
        "decode_steps": 16,
    },
    "full": {
        "lengths": [32, 64, 128, 256, 512, 1024],
        "d_model": 256,
        "batch": 8,
        "repeats": 5,
        "decode_steps": 32,
    },
}
VOCAB = 256
LAYERS = 2


def matched_lstm(target: int, max_len: int) -> RNNLanguageModel:
    """The 2-layer LSTM LM whose parameter count is closest to `target` (hidden size searched, even)."""
    best: RNNLanguageModel | None = None
    for hidden in range(16, 2048, 2):
        cfg = LMConfig(
            architecture="lstm", vocab_size=VOCAB, d_model=hidden, n_layers=LAYERS, n_heads=1, dropout=0.0
        )
        cfg = cfg.replace(max_seq_len=max_len)
        count = 8 * hidden * hidden * LAYERS + VOCAB * hidden  # dominant terms, to skip building most
        if count < 0.8 * target:
            continue
        model = RNNLanguageModel(cfg)
        if best is None or abs(n_params(model) - target) < abs(n_params(best) - target):
            best = model
        if n_params(model) > target:
            break
    assert best is not None
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    logits = model(x[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _sync(x.device)


@torch.no_grad()
def _decode_time(model: torch.nn.Module, context: int, steps: int, repeats: int) -> float:
    """Seconds per generated token after a prompt of `context` tokens, with the cache."""
    device = next(model.parameters()).device
    prompt = torch.randint(0, VOCAB, (1, context), device=device)
    times = []
    for _ in range(repeats + 1):
        out = model(prompt, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, cache=cache)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        _sync(device)
        times.append((time.perf_counter() - start) / steps)
    return sorted(times[1:])[len(times[1:]) // 2]


def run(out: Path, size: str) -> Result:
    s = SETTINGS[size]
    lengths, d, batch, repeats = s["lengths"], s["d_model"], s["batch"], s["repeats"]
    max_len = max(lengths) + s["decode_steps"] + 1
    torch.manual_seed(0)
    tf_cfg = LMConfig(
        vocab_size=VOCAB, d_model=d, n_heads=4, d_ff=4 * d, n_layers=LAYERS, dropout=0.0, max_seq_len=max_len
    )
    lstm = matched_lstm(n_params(LanguageModel(tf_cfg)), max_len)
    torch.manual_seed(0)
    device = torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )  # the claim is about parallel hardware
    models: dict[str, torch.nn.Module] = {  # both with tformer.accel's kernels, as the CLI trains them
        "Transformer": accel.apply(LanguageModel(tf_cfg).to(device)),
        "LSTM": accel.apply(lstm.to(device)),
    }
    params = {name: n_params(m) for name, m in models.items()}
    train: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    for length in lengths:
        x = torch.randint(0, VOCAB, (batch, length + 1), device=device)
        for name, model in models.items():
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            train[name].append(median_seconds(partial(_train_step, model, opt, x), repeats))
            model.eval()
            decode[name].append(_decode_time(model, length, s["decode_steps"], repeats))
    tokens = [batch * n for n in lengths]
    result = Result("parallelism", CLAIM, size)
    result.notes = [
        f"Causal Transformer LM ({LAYERS} layers, d_model {d}, 4 heads, sdpa attention) vs {LAYERS}-layer "
        f"LSTM LM (hidden {lstm.config.d_model}); parameters {params['Transformer']:,} vs "
        f"{params['LSTM']:,}. Random tokens (vocabulary {VOCAB}), batch {batch}, on {device.type} "
        "(a GPU is used when present).",
        f"Training: median of {repeats} timed steps (forward, backward, Adam) after one warm-up step.",
        "Decoding: median seconds per generated token (batch 1) after a prompt of the given length, "
        "with the KV cache (Transformer) or the recurrent state (LSTM).",
        "On a shared CPU the absolute times carry contention noise.",
    ]
    result.numbers = {
        "lengths": lengths,
        "batch": batch,
        "device": device.type,
        "parameters": params,
        "train_seconds_per_batch": train,
        "decode_seconds_per_token": decode,
        "lstm_over_transformer_train": [
            lstm / tf for lstm, tf in zip(train["LSTM"], train["Transformer"], strict=True)
        ],
        "train_growth_first_to_last": {name: values[-1] / values[0] for name, values in train.items()},
    }
    result.tables.append(
        Table(
            "Training time per batch (ms) and per token (us)",
            [
                "length",
                "Transformer ms",
                "LSTM ms",
                "LSTM / Transformer",
                "Transformer us/token",
                "LSTM us/token",
            ],
            [
                [n, 1e3 * a, 1e3 * b, b / a, 1e6 * a / t, 1e6 * b / t]
                for n, a, b, t in zip(lengths, train["Transformer"], train["LSTM"], tokens, strict=True)
            ],
        )
    )
    result.tables.append(
        Table(
            "Decoding time per token (ms) after a prompt of this length",
            ["context", "Transformer ms", "LSTM ms"],
            [
                [n, 1e3 * a, 1e3 * b]
                for n, a, b in zip(lengths, decode["Transformer"], decode["LSTM"], strict=True)
            ],
        )
    )
    result.plots.append(
        line_plot(
            out / "parallelism.png",
            [
                {
                    "series": {k: (lengths, [1e3 * t for t in v]) for k, v in train.items()},
                    "xlabel": "sequence length",
                    "ylabel": "ms per training batch",
                    "logx": True,
                    "logy": True,
                    "title": f"training step, batch {batch}",
                },
                {
                    "series": {
                        k: (lengths, [1e6 * t / n for t, n in zip(v, tokens, strict=True)])
                        for k, v in train.items()
                    },
                    "xlabel": "sequence length",
                    "ylabel": "us per training token",
                    "logx": True,
                    "title": "training time per token",
                },
                {
                    "series": {k: (lengths, [1e3 * t for t in v]) for k, v in decode.items()},
                    "xlabel": "context length",
                    "ylabel": "ms per generated token",
                    "logx": True,
                    "title": "decoding (cached), batch 1",
                },
            ],
            title=f"Transformer vs LSTM, {params['Transformer'] / 1e6:.2f}M vs {params['LSTM'] / 1e6:.2f}M parameters",
        )
    )
    return result
