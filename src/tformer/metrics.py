"""Metrics people report: BLEU and chrF through sacrebleu, exact match, perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import sacrebleu


@dataclass(frozen=True)
class Bleu:
    score: float
    signature: str


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> Bleu:
    """Corpus BLEU, cased and detokenised (sacrebleu's defaults), with sacrebleu's signature."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    metric = sacrebleu.metrics.BLEU()
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return Bleu(result.score, str(metric.get_signature()))


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    return sacrebleu.metrics.CHRF().corpus_score(list(hypotheses), [list(references)]).score


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference after stripping surrounding whitespace."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        return 0.0
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True)) / len(references)


def perplexity(nll_per_token: float) -> float:
    return math.exp(min(nll_per_token, 700.0))


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / max(1, len(labels))


def macro_f1(predictions: Sequence[int], labels: Sequence[int], n_classes: int) -> float:
    """Unweighted mean of F1 = 2PR / (P + R) over the classes that occur in the labels or the predictions
    (as scikit-learn averages); `n_classes` bounds the class ids."""
    present = sorted(set(labels) | set(predictions))
    if any(not 0 <= c < n_classes for c in present):
        raise ValueError(f"class ids must be in [0, {n_classes}), got {present}")
    scores = []
    for c in present:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(1, len(scores))
