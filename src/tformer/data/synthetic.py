"""The embedded default task, made by the package itself: numbers in French words -> English words.

"quatre-vingt-dix-sept mille deux cent un" -> "ninety-seven thousand, two hundred and one". The mapping
needs real transduction: vocabulary mapping (trois -> three), reordering and re-segmentation
(quatre-vingt-dix-sept = 4*20+17 -> ninety-seven), words that appear on one side only ("and", commas),
and agreement rules (quatre-vingts vs quatre-vingt-un). Generated with `num2words`, deterministic by seed,
no download. Validation and test numbers never occur in training.
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


def _draw(rng: random.Random, max_digits: int) -> int:
    """A number whose digit count is uniform in 1..max_digits (then uniform among those numbers); one in
    four is rounded down to a multiple of 10, 100, ... ("soixante et onze mille", "deux cents"), which
    uniform draws almost never produce and people type first."""
    digits = rng.randint(1, max_digits)
    n = rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)
    if digits > 1 and rng.random() < 0.25:
        step = 10 ** rng.randint(1, digits - 1)
        n -= n % step
    return n


def number_translation(
    n_train: int, n_valid: int, n_test: int, *, seed: int = 0, max_digits: int = 6
) -> dict[str, list[Pair]]:
    """Train / valid / test splits of French -> English number words.

    Training numbers are drawn with replacement, digit count uniform, so the short irregular numbers
    ("soixante et onze", "quatre-vingts") come up as often as a whole digit class, many times each.
    Validation and test numbers are distinct and never occur in training: held-out means unseen.
    """
    rng = random.Random(seed)
    train = [_draw(rng, max_digits) for _ in range(n_train)]
    seen = set(train)
    held: list[int] = []
    attempts = 0
    while len(held) < n_valid + n_test:
        attempts += 1
        if attempts > 100 * (n_valid + n_test) + 10_000:
            raise ValueError(
                f"cannot find {n_valid + n_test} held-out numbers below 10**{max_digits} that are not in "
                f"the {len(seen):,} training numbers; lower the counts or raise max_digits"
            )
        n = _draw(rng, max_digits)
        if n not in seen:
            seen.add(n)
            held.append(n)
    words: dict[int, Pair] = {}

    def pairs(numbers: list[int]) -> list[Pair]:
        return [words.setdefault(n, number_words(n)) for n in numbers]

    return {"train": pairs(train), "valid": pairs(held[:n_valid]), "test": pairs(held[n_valid:])}
