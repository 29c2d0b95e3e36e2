"""Length-bucketed batches of token-id pairs, padded once per batch.

Examples are sorted by length within large random pools, cut into batches of about `batch_tokens` tokens,
and the batches shuffled, so padding is small and every epoch's order is a function of (seed, epoch) alone:
a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PairBatch:
    src: Tensor  # (B, S) source ids, padded
    tgt_in: Tensor  # (B, T) BOS + target, padded: the decoder input (teacher forcing)
    tgt_out: Tensor  # (B, T) target + EOS, padded: what each position must predict
    n_tokens: int  # real target tokens (the loss denominator)

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.n_tokens)


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """List of id lists -> (B, max length) long tensor padded with pad_id."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def make_pair_batch(
    src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], *, pad_id: int, bos_id: int, eos_id: int
) -> PairBatch:
    tgt_in = pad([[bos_id, *t] for t in tgt], pad_id)
    tgt_out = pad([[*t, eos_id] for t in tgt], pad_id)
    return PairBatch(pad(src, pad_id), tgt_in, tgt_out, sum(len(t) + 1 for t in tgt))


def bucket_batches(
    lengths: Sequence[int],
    *,
    batch_tokens: int,
    max_sentences: int,
    seed: int | None,
    pool: int = 100,
) -> list[list[int]]:
    """Indices grouped into batches of similar length, padded size <= batch_tokens (at least one each).

    `seed=None` keeps the data order (evaluation); otherwise shuffled by `seed` (use seed + epoch).
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    batches: list[list[int]] = []
    chunk = max(1, pool * max(1, batch_tokens // max(1, max(lengths, default=1))))
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batch: list[int] = []
        longest = 0
        for i in group:
            longest_if = max(longest, lengths[i])
            if batch and (longest_if * (len(batch) + 1) > batch_tokens or len(batch) >= max_sentences):
                batches.append(batch)
                batch, longest_if = [], lengths[i]
            batch.append(i)
            longest = longest_if
        if batch:
            batches.append(batch)
    if seed is not None:
        rng.shuffle(batches)
    return batches
