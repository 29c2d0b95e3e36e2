"""Claim: self-attention is blind to order; positional encodings carry it, and sinusoidal ones may let the
model extrapolate to sequences longer than those seen in training (Vaswani et al., 2017, 3.5).

Task (generated) where only order matters: a sequence of random filler symbols holds one A and one B; the
label is whether A comes before B. An encoder classifier (bidirectional, mean pooling) with sinusoidal,
learned, rotary or no positions is trained on lengths 8-32 and tested on lengths up to 4x longer. Without
positions the encoder is permutation-invariant: it cannot tell "A ... B" from "B ... A" (chance, 50%).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import torch

from tformer.config import ClassifierConfig
from tformer.experiments.common import Result, Table, line_plot
from tformer.experiments.training import classification_loss, fit
from tformer.models.classifier import Classifier

CLAIM = (
    "Attention has no notion of order; positional encodings inject it, and the sinusoid 'may allow the "
    "model to extrapolate to sequence lengths longer than the ones encountered during training' "
    "(Vaswani et al., 2017, 3.5)."
)
KINDS = ["sinusoidal", "learned", "rotary", "none"]


class Settings(TypedDict):
    steps: int
    d_model: int
    batch: int
    test: int
    test_lengths: list[int]


SETTINGS: dict[str, Settings] = {
    "quick": {"steps": 60, "d_model": 32, "batch": 32, "test": 256, "test_lengths": [16, 32, 64]},
    "medium": {
        "steps": 500,
        "d_model": 64,
        "batch": 32,
        "test": 1000,
        "test_lengths": [16, 32, 48, 64, 96, 128],
    },
    "full": {
        "steps": 2000,
        "d_model": 128,
        "batch": 64,
        "test": 2000,
        "test_lengths": [16, 32, 48, 64, 96, 128],
    },
}
TRAIN_LENGTHS = (8, 32)
A, B, FILLER0, FILLERS = 4, 5, 6, 20  # token ids (0-3 are the specials)


def order_batch(n: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, length) sequences of fillers with one A and one B at random positions; label 1 iff A before B."""
    x = torch.randint(FILLER0, FILLER0 + FILLERS, (n, length), generator=g)
    pos = torch.rand(n, length, generator=g).argsort(-1)[:, :2]  # two distinct positions
    rows = torch.arange(n)
    x[rows, pos[:, 0]] = A
    x[rows, pos[:, 1]] = B
    return x, (pos[:, 0] < pos[:, 1]).long()


def mirrored_test(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n / 2 sequences and the same ones with A and B swapped: exactly balanced, and a model that cannot
    see order gives both halves the same answer, so it scores exactly 0.5."""
    x, y = order_batch(n // 2, length, torch.Generator().manual_seed(seed))
    swapped = x.clone()
    swapped[x == A], swapped[x == B] = B, A
    return torch.cat([x, swapped]), torch.cat([y, 1 - y])


def train_batches(n: int, batch: int, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` training batches, each of one random length in TRAIN_LENGTHS."""
    batches = []
    for _ in range(n):
        length = int(torch.randint(TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] + 1, (1,), generator=g))
        batches.append(order_batch(batch, length, g))
    return batches


def run(out: Path, size: str) -> Result:
    s = SETTINGS[size]
    max_len = max(s["test_lengths"])
    batches = train_batches(
        s["steps"], s["batch"], torch.Generator().manual_seed(0)
    )  # the same for every kind
    accuracy: dict[str, list[float]] = {}
    for kind in KINDS:
        torch.manual_seed(0)
        cfg = ClassifierConfig(
            vocab_size=FILLER0 + FILLERS,
            d_model=s["d_model"],
            n_heads=4,
            d_ff=4 * s["d_model"],
            n_layers=2,
            dropout=0.0,
            max_seq_len=max_len,
            positions=kind,
            pooling="mean",
            norm_first=True,
        )
        model = Classifier(cfg)
        fit(model, batches, classification_loss, out / "runs" / kind, lr=1e-3, warmup=s["steps"] // 10)
        accuracy[kind] = []
        with torch.no_grad():
            for length in s["test_lengths"]:
                x, y = mirrored_test(s["test"], length, 7 + length)
                accuracy[kind].append(float((model(x).logits.argmax(-1) == y).float().mean()))
    result = Result("positions", CLAIM, size)
    result.notes = [
        f"Generated task: {FILLERS} filler symbols, one A and one B; label: A before B (balanced). Trained on "
        f"lengths {TRAIN_LENGTHS[0]}-{TRAIN_LENGTHS[1]}, tested on {s['test']} fresh sequences per length "
        "(half of them the other half with A and B swapped).",
        f"Encoder classifier: 2 pre-norm layers, d_model {s['d_model']}, 4 heads, mean pooling, max_seq_len "
        f"{max_len} (learned positions past {TRAIN_LENGTHS[1]} are never trained); {s['steps']} Adam steps "
        f"through the Trainer (lr 1e-3, linear warm-up over the first tenth, then cosine), batch {s['batch']}.",
        "Chance is 0.5; with no positions the encoder is permutation-invariant: it answers a sequence and "
        "its swap alike and scores exactly 0.5 on this test set.",
    ]
    result.numbers = {
        "test_lengths": s["test_lengths"],
        "train_lengths": list(TRAIN_LENGTHS),
        "accuracy": accuracy,
    }
    result.tables.append(
        Table(
            "Accuracy by test length (trained on 8-32)",
            ["positions", *(str(n) for n in s["test_lengths"])],
            [[k, *v] for k, v in accuracy.items()],
        )
    )
    result.plots.append(
        line_plot(
            out / "positions.png",
            [
                {
                    "series": {k: (s["test_lengths"], v) for k, v in accuracy.items()},
                    "xlabel": "test sequence length (trained on 8-32)",
                    "ylabel": "accuracy (is A before B?)",
                    "hline": (0.5, "chance"),
                    "title": "order task, beyond the training lengths",
                }
            ],
        )
    )
    return result
