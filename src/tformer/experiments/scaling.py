"""Claim: dividing the attention scores by sqrt(d_k) keeps the softmax out of its saturated region, where
its gradients vanish (Vaswani et al., 2017, section 3.2.1 and footnote 4).

Measured two ways. (1) Exactly, in float64 on random unit-variance queries and keys, across d_k: the
spread of the scores, the largest softmax probability, and the norm of the gradient that reaches the
scores, with and without the factor. (2) Training curves of a character language model (Tiny Shakespeare)
with one head of large d_k, with and without the factor, everything else equal.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.attention.multihead import MultiHeadAttention
from tformer.config import LMConfig
from tformer.experiments.common import Panel, Result, Table, char_corpus, line_plot
from tformer.experiments.training import CharLMSettings, Point, char_lm_batches, fit_char_lm
from tformer.models.lm import LanguageModel

CLAIM = (
    "For large d_k the dot products grow large in magnitude, pushing the softmax into regions with "
    "extremely small gradients; scaling by 1/sqrt(d_k) counteracts this (Vaswani et al., 2017, 3.2.1)."
)
D_K = [4, 16, 64, 256, 1024]


class Settings(CharLMSettings):
    samples: int
    d_model: int


SETTINGS: dict[str, Settings] = {
    "quick": {"samples": 256, "steps": 30, "d_model": 32, "block": 32, "batch": 8, "every": 10},
    "medium": {"samples": 2000, "steps": 300, "d_model": 128, "block": 64, "batch": 16, "every": 30},
    "full": {"samples": 4000, "steps": 1500, "d_model": 256, "block": 128, "batch": 32, "every": 100},
}
KEYS = 64  # keys per query in the exact measurement


def softmax_statistics(d_k: int, samples: int, scaled: bool, seed: int = 0) -> dict[str, float]:
    """q, k ~ N(0, 1)^d_k, KEYS keys per query, float64: score std, mean max probability, mean gradient norm
    d(sum_j p_j g_j)/d(scores) for an upstream gradient g ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(samples, 1, d_k, generator=g, dtype=torch.float64)
    k = torch.randn(samples, KEYS, d_k, generator=g, dtype=torch.float64)
    upstream = torch.randn(samples, KEYS, generator=g, dtype=torch.float64)
    scores = (q @ k.transpose(1, 2))[:, 0] * (d_k**-0.5 if scaled else 1.0)  # (N, KEYS)
    scores.requires_grad_(True)
    p = torch.softmax(scores, dim=-1)
    (p * upstream).sum().backward()
    assert scores.grad is not None
    return {
        "score_std": float(scores.detach().std()),
        "max_probability": float(p.detach().max(-1).values.mean()),
        "grad_norm": float(scores.grad.norm(dim=-1).mean()),
    }


def unscale(model: torch.nn.Module) -> None:
    """Attention without the 1/sqrt(d_k) factor: the kernel takes the score function's `scale` (None:
    1/sqrt(d_k)); for the paper's dot product pass 1.0."""
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            if module.score.kind != "dot":
                raise ValueError(f"unscale needs the dot-product score, not {module.score.kind!r}")
            module.score.scale = 1.0


def paper_init(model: LanguageModel) -> None:
    """Xavier-uniform attention and feed-forward matrices, as the paper's models (and tformer's Seq2Seq)
    are initialised: unit-variance inputs then give scores of variance ~d_k / 4, the regime the claim is
    about. (GPT-2's N(0, 0.02) keeps initial scores tiny whatever the scaling.)"""
    for module in model.modules():  # every layer's projections; not the output, tied to the embedding
        if isinstance(module, torch.nn.Linear) and module is not model.output:
            torch.nn.init.xavier_uniform_(module.weight)


def run(out: Path, size: str) -> Result:
    s = SETTINGS[size]
    exact = {
        f"{'scaled' if scaled else 'unscaled'}": [softmax_statistics(d, s["samples"], scaled) for d in D_K]
        for scaled in (True, False)
    }
    train_ids, valid_ids, vocab, what = char_corpus(size)
    batches = char_lm_batches(train_ids, s)
    curves: dict[str, list[Point]] = {}
    for label in ("scaled 1/sqrt(d_k)", "unscaled"):
        torch.manual_seed(0)
        cfg = LMConfig(
            vocab_size=vocab,
            d_model=s["d_model"],
            n_heads=1,
            d_ff=4 * s["d_model"],
            n_layers=2,
            dropout=0.0,
            max_seq_len=s["block"],
            attention="math",
        )
        model = LanguageModel(cfg)
        paper_init(model)
        if label == "unscaled":
            unscale(model)
        run_dir = out / "runs" / ("scaled" if label != "unscaled" else "unscaled")
        curves[label] = fit_char_lm(model, batches, valid_ids, s, run_dir, lr=1e-3)
    result = Result("scaling", CLAIM, size)
    result.notes = [
        f"Exact part: float64, {s['samples']} random queries against {KEYS} keys each, q and k ~ N(0, 1)^d_k; "
        "gradient: of sum_j p_j g_j with respect to the scores, g ~ N(0, 1).",
        f"Training part: {what}; causal LM, 2 layers, one head of d_k = d_model = {s['d_model']}, pre-norm, "
        f"Xavier-initialised attention (the paper's regime), {s['steps']} steps of batch {s['batch']} x "
        f"{s['block']} characters, Adam lr 1e-3 through the Trainer (linear warm-up over the first tenth, "
        "then cosine); validation loss on 8 fixed batches.",
    ]
    result.numbers = {
        "d_k": D_K,
        "exact": exact,
        "training": {k: [list(r) for r in v] for k, v in curves.items()},
        "final_valid_loss": {k: v[-1].valid_loss for k, v in curves.items()},
    }
    result.tables.append(
        Table(
            "Softmax over 64 keys, float64",
            [
                "d_k",
                "score std scaled",
                "unscaled",
                "max p scaled",
                "unscaled",
                "grad norm scaled",
                "unscaled",
            ],
            [
                [
                    d,
                    a["score_std"],
                    b["score_std"],
                    a["max_probability"],
                    b["max_probability"],
                    a["grad_norm"],
                    b["grad_norm"],
                ]
                for d, a, b in zip(D_K, exact["scaled"], exact["unscaled"], strict=True)
            ],
        )
    )
    result.tables.append(
        Table(
            "Character LM validation loss (nats) during training",
            ["step", *curves],
            [
                [r.step, *(curves[k][i].valid_loss for k in curves)]
                for i, r in enumerate(next(iter(curves.values())))
            ],
        )
    )
    panels: list[Panel] = [
        {
            "series": {k: (D_K, [r[key] for r in v]) for k, v in exact.items()},
            "xlabel": "d_k",
            "ylabel": ylabel,
            "logx": True,
            "logy": key == "grad_norm",
            "title": title,
        }
        for key, ylabel, title in (
            ("score_std", "std of scores", "spread of the scores"),
            ("max_probability", "mean max softmax probability", "saturation"),
            ("grad_norm", "|d loss / d scores|", "gradient reaching the scores"),
        )
    ]
    result.plots.append(line_plot(out / "scaling_softmax.png", panels))
    result.plots.append(
        line_plot(
            out / "scaling_training.png",
            [
                {
                    "series": {
                        k: ([r.step for r in v], [r.valid_loss for r in v]) for k, v in curves.items()
                    },
                    "xlabel": "step",
                    "ylabel": "validation loss (nats / char)",
                    "title": f"char LM, one head, d_k = {s['d_model']}",
                }
            ],
        )
    )
    return result
