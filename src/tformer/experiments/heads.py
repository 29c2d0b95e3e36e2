"""Claim: several attention heads beat one at the same d_model (Vaswani et al., 2017, table 3 rows A:
one head is 0.9 BLEU worse than eight; too many heads also hurt).

Measured: character language models on Tiny Shakespeare with 1, 2, 4, 8, 16 heads at fixed d_model (so
d_k = d_model / heads), everything else equal; validation loss curves and the final loss.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.config import LMConfig
from tformer.experiments.common import Result, Table, char_corpus, line_plot
from tformer.experiments.training import CharLMSettings, Point, char_lm_batches, fit_char_lm
from tformer.models.lm import LanguageModel

CLAIM = (
    "Multi-head attention lets the model attend to information from different representation subspaces "
    "at different positions; a single head averages this away (Vaswani et al., 2017, 3.2.2 and table 3 A)."
)


class Settings(CharLMSettings):
    heads: list[int]
    d_model: int


SETTINGS: dict[str, Settings] = {
    "quick": {"heads": [1, 2, 4], "steps": 20, "d_model": 32, "block": 32, "batch": 8, "every": 10},
    "medium": {
        "heads": [1, 2, 4, 8, 16],
        "steps": 300,
        "d_model": 128,
        "block": 64,
        "batch": 16,
        "every": 30,
    },
    "full": {
        "heads": [1, 2, 4, 8, 16],
        "steps": 1500,
        "d_model": 128,
        "block": 128,
        "batch": 32,
        "every": 100,
    },
}


def run(out: Path, size: str) -> Result:
    s = SETTINGS[size]
    train_ids, valid_ids, vocab, what = char_corpus(size)
    batches = char_lm_batches(train_ids, s)
    curves: dict[str, list[Point]] = {}
    for h in s["heads"]:
        torch.manual_seed(0)
        cfg = LMConfig(
            vocab_size=vocab,
            d_model=s["d_model"],
            n_heads=h,
            d_ff=4 * s["d_model"],
            n_layers=2,
            dropout=0.0,
            max_seq_len=s["block"],
        )
        model = LanguageModel(cfg)
        label = f"{h} head{'s' if h > 1 else ''}"
        curves[label] = fit_char_lm(model, batches, valid_ids, s, out / "runs" / f"heads_{h}", lr=2e-3)
    final = {k: v[-1].valid_loss for k, v in curves.items()}
    result = Result("heads", CLAIM, size)
    result.notes = [
        f"{what}; causal LM, 2 layers, d_model {s['d_model']} (d_k = d_model / heads), d_ff "
        f"{4 * s['d_model']}, learned positions, {s['steps']} Adam steps through the Trainer (lr 2e-3, linear "
        f"warm-up over the first tenth, then cosine) of batch {s['batch']} x {s['block']} characters, the same batches for every model.",
        "Validation loss: mean over 8 fixed validation batches. Parameter count is the same for every head "
        "count (the projections are d_model x d_model whatever the split).",
        "One seed per setting: differences of a few hundredths of a nat are within seed noise.",
    ]
    result.numbers = {
        "heads": s["heads"],
        "final_valid_loss": final,
        "curves": {k: [list(r) for r in v] for k, v in curves.items()},
    }
    result.tables.append(
        Table(
            "Final validation loss (nats per character)",
            ["heads", "d_k", "validation loss", "last training loss"],
            [
                [h, s["d_model"] // h, v[-1].valid_loss, v[-1].train_loss]
                for h, v in zip(s["heads"], curves.values(), strict=True)
            ],
        )
    )
    result.plots.append(
        line_plot(
            out / "heads.png",
            [
                {
                    "series": {
                        k: ([r.step for r in v], [r.valid_loss for r in v]) for k, v in curves.items()
                    },
                    "xlabel": "step",
                    "ylabel": "validation loss (nats / char)",
                    "title": "training curves",
                },
                {
                    "series": {"final": (s["heads"], list(final.values()))},
                    "xlabel": "heads",
                    "ylabel": "final validation loss",
                    "logx": True,
                    "title": f"d_model {s['d_model']}",
                },
            ],
        )
    )
    return result
