"""The embedded default task, made by the package itself: numbers in French words -> English words.

"quatre-vingt-dix-sept mille deux cent un" -> "ninety-seven thousand, two hundred and one". The mapping
needs real transduction: vocabulary mapping (trois -> three), reordering and re-segmentation
(quatre-vingt-dix-sept = 4*20+17 -> ninety-seven), words that appear on one side only ("and", commas),
and agreement rules (quatre-vingts vs quatre-vingt-un). Generated with `num2words`, deterministic by seed,
no download. Splits never share a number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from num2words import num2words


@dataclass(frozen=True)
class Pair:
    src: str
    tgt: str


def number_words(n: int) -> Pair:
    return Pair(num2words(n, lang="fr"), num2words(n, lang="en"))


def sample_numbers(count: int, *, seed: int, max_digits: int = 6) -> list[int]:
    """`count` distinct numbers; the digit count is uniform in 1..max_digits, so small numbers (whose
    irregular words are the hard part) are as common as large ones."""
    rng = random.Random(seed)
    space = 10**max_digits
    if count > space // 2:
        raise ValueError(
            f"cannot draw {count} distinct numbers below {space}; lower count or raise max_digits"
        )
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < count:
        digits = rng.randint(1, max_digits)
        n = rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def number_translation(
    n_train: int, n_valid: int, n_test: int, *, seed: int = 0, max_digits: int = 6
) -> dict[str, list[Pair]]:
    """Disjoint train / valid / test splits of French -> English number words."""
    numbers = sample_numbers(n_train + n_valid + n_test, seed=seed, max_digits=max_digits)
    pairs = [number_words(n) for n in numbers]
    return {
        "train": pairs[:n_train],
        "valid": pairs[n_train : n_train + n_valid],
        "test": pairs[n_train + n_valid :],
    }
