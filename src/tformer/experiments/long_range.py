"""Claim: self-attention connects any two positions in one step, so it learns dependencies across long
distances more easily than an RNN, whose signal must pass through d recurrent steps.

Task (generated): a sequence of d + 8 random symbols; at the last position the model must output the
symbol d positions back. Everything else in the sequence is a distractor. A causal Transformer LM and an
LSTM LM of similar size are trained for the same number of steps at each d; accuracy on fresh sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import torch
import torch.nn.functional as F

from tformer.config import LMConfig
from tformer.experiments.common import Result, Table, line_plot, n_params
from tformer.experiments.training import fit
from tformer.models.lm import LanguageModel
from tformer.models.rnn import RNNLanguageModel
from tformer.training.trainer import LossValue

CLAIM = (
    "The path between two positions is O(1) in self-attention and O(d) in a recurrent network, so the "
    "Transformer learns long-range dependencies more easily (Vaswani et al., 2017, section 4)."
)


class Settings(TypedDict):
    distances: list[int]
    steps: int
    d_model: int
    batch: int
    test: int


SETTINGS: dict[str, Settings] = {
    "quick": {"distances": [2, 8, 24], "steps": 80, "d_model": 32, "batch": 32, "test": 256},
    "medium": {"distances": [4, 16, 64, 128], "steps": 400, "d_model": 64, "batch": 32, "test": 1000},
    "full": {"distances": [4, 16, 64, 128, 256], "steps": 900, "d_model": 128, "batch": 64, "test": 2000},
}
SYMBOLS = 16
PREFIX = 8
LR = {"Transformer": 2e-3, "LSTM": 1e-2}  # the better of 2e-3 and 1e-2 for each in a short trial


def batch(distance: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, distance + PREFIX) random symbols and the symbol `distance` positions before the last one."""
    x = torch.randint(0, SYMBOLS, (n, distance + PREFIX), generator=g)
    return x, x[:, -1 - distance]


def models(d: int, max_len: int) -> dict[str, torch.nn.Module]:
    tf = LanguageModel(
        LMConfig(
            vocab_size=SYMBOLS, d_model=d, n_heads=4, d_ff=4 * d, n_layers=2, dropout=0.0, max_seq_len=max_len
        )
    )
    lstm = RNNLanguageModel(
        LMConfig(
            architecture="lstm",
            vocab_size=SYMBOLS,
            d_model=int(d * 1.25) // 2 * 2,  # about the Transformer's parameter count
            n_layers=2,
            n_heads=1,
            dropout=0.0,
            max_seq_len=max_len,
        )
    )
    return {"Transformer": tf, "LSTM": lstm}


def recall_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> LossValue:
    """Summed cross-entropy of the prediction at the last position only (the rest are distractors)."""
    x, y = batch
    return LossValue(F.cross_entropy(model(x).logits[:, -1], y, reduction="sum"), y.numel(), x.numel())


def run(out: Path, size: str) -> Result:
    s = SETTINGS[size]
    acc: dict[str, list[float]] = {"Transformer": [], "LSTM": []}
    params: dict[str, int] = {}
    for distance in s["distances"]:
        g = torch.Generator().manual_seed(distance)
        batches = [batch(distance, s["batch"], g) for _ in range(s["steps"])]  # the same for both models
        for name, model in models(s["d_model"], distance + PREFIX).items():
            torch.manual_seed(0)
            params[name] = n_params(model)
            run_dir = out / "runs" / f"{name.lower()}_d{distance}"
            fit(model, batches, recall_loss, run_dir, lr=LR[name], warmup=min(100, s["steps"] // 10))
            x, y = batch(distance, s["test"], torch.Generator().manual_seed(10_000 + distance))
            with torch.no_grad():
                acc[name].append(float((model(x).logits[:, -1].argmax(-1) == y).float().mean()))
    result = Result("long-range", CLAIM, size)
    result.notes = [
        f"Generated task: {PREFIX} + d random symbols (alphabet {SYMBOLS}); predict at the last position the "
        f"symbol d back. Chance: {1 / SYMBOLS:.3f}.",
        f"Causal Transformer LM (2 layers, d_model {s['d_model']}, 4 heads, learned positions; "
        f"{params['Transformer']:,} parameters) vs 2-layer LSTM LM ({params['LSTM']:,} parameters).",
        f"Each: {s['steps']} Adam steps (peak lr {LR['Transformer']:g} Transformer / {LR['LSTM']:g} LSTM, "
        f"the better of 2e-3 and 1e-2 for each in a short trial; through the Trainer, linear warm-up then "
        f"cosine), batch {s['batch']}; accuracy on "
        f"{s['test']} fresh sequences.",
    ]
    result.numbers = {
        "distances": s["distances"],
        "accuracy": acc,
        "chance": 1 / SYMBOLS,
        "parameters": params,
    }
    result.tables.append(
        Table(
            "Accuracy at recalling the symbol d positions back",
            ["d", "Transformer", "LSTM"],
            [[d, a, b] for d, a, b in zip(s["distances"], acc["Transformer"], acc["LSTM"], strict=True)],
        )
    )
    result.plots.append(
        line_plot(
            out / "long_range.png",
            [
                {
                    "series": {k: (s["distances"], v) for k, v in acc.items()},
                    "xlabel": "distance d (tokens back)",
                    "ylabel": "accuracy",
                    "logx": True,
                    "hline": (1 / SYMBOLS, "chance"),
                    "title": f"recall the token d back ({s['steps']} steps each)",
                }
            ],
        )
    )
    return result
