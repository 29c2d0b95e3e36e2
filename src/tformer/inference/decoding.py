"""Autoregressive decoding of an encoder-decoder: greedy and batched beam search, both incremental.

The source is encoded once; every decoder layer's cross-attention keys/values are computed once per
source (`Seq2Seq.start_cache`; any `IncrementalSeq2Seq`, RNNSeq2Seq too); each step feeds one token and writes its self-attention keys and values
into static buffers of `max_len` positions, allocated once (beam search reorders them in place). Scores are sums of token log-probabilities (EOS included); beam search ranks finished hypotheses
by score / lp(length), with GNMT's lp(n) = ((5 + n) / 6) ** length_penalty (Wu et al., 2016).

Both run the model in eval mode; a model already in it is not written to, so threads may share it
(tformer.inference.modes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

from tformer.attention.kv_cache import DecodingCache
from tformer.config import Seq2SeqConfig
from tformer.inference.modes import evaluating
from tformer.models.seq2seq import Seq2SeqOutput

C = TypeVar("C", bound=DecodingCache)


class IncrementalSeq2Seq(Protocol[C]):
    """What greedy and beam search need of an encoder-decoder (Seq2Seq, RNNSeq2Seq): encode once, start a
    cache of type C from the memory, feed tokens after the cached ones."""

    @property
    def config(self) -> Seq2SeqConfig: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def eval(self) -> object: ...

    def encode(
        self, src: Tensor, *, src_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor, list[Tensor] | None]: ...

    def start_cache(
        self, memory: Tensor, memory_mask: Tensor | None, *, capacity: int | None = None
    ) -> C: ...

    def decode_step(
        self, tgt: Tensor, cache: C, *, need_weights: bool = False, checked: bool = False
    ) -> Seq2SeqOutput: ...


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without BOS and EOS
    score: float  # sum of log-probabilities, EOS included when it was produced
    finished: bool  # ended with EOS (False: cut at max_len)


def _check_inputs(model: IncrementalSeq2Seq[C], src: Tensor, bos_id: int, eos_id: int) -> None:
    if not isinstance(src, Tensor) or src.dim() != 2:
        raise ValueError(f"src has shape {tuple(getattr(src, 'shape', ()))}; expected (B, S) token ids")
    v = model.config.tgt_vocab_size
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if not 0 <= value < v:
            raise ValueError(f"{name} = {value} is outside the target vocabulary [0, {v})")


def _max_steps(model: IncrementalSeq2Seq[C], max_len: int | None, src_len: int) -> int:
    limit = model.config.max_seq_len
    if max_len is None:
        max_len = min(limit, 2 * src_len + 10)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return min(max_len, limit)


def _next_logp(model: IncrementalSeq2Seq[C], logits: Tensor, bos_id: int) -> Tensor:
    """(N, V) last-position logits -> float64 log-probabilities; PAD and BOS are never generated."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    logp[:, [model.config.pad_id, bos_id]] = float("-inf")
    return logp


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def greedy_decode(
    model: IncrementalSeq2Seq[C],
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    max_len: int | None = None,
    src_mask: Tensor | None = None,
) -> list[Hypothesis]:
    """Pick the most probable token at each step. src (B, S) -> one hypothesis per row."""
    with evaluating(model), torch.no_grad():
        return _greedy(model, src, bos_id, eos_id, max_len, src_mask)


def _greedy(
    model: IncrementalSeq2Seq[C],
    src: Tensor,
    bos_id: int,
    eos_id: int,
    max_len: int | None,
    src_mask: Tensor | None,
) -> list[Hypothesis]:
    _check_inputs(model, src, bos_id, eos_id)
    steps = _max_steps(model, max_len, src.shape[1])
    memory, memory_mask, _ = model.encode(src, src_mask=src_mask)
    cache = model.start_cache(memory, memory_mask, capacity=steps)  # static: written in place per step
    b = src.shape[0]
    token = torch.full((b, 1), bos_id, dtype=torch.long, device=src.device)
    out = torch.empty(b, steps, dtype=torch.long, device=src.device)
    scores = torch.zeros(b, dtype=torch.float64, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    for t in range(steps):
        # the tokens fed back are argmaxes over the vocabulary: no need to validate them again
        logits = model.decode_step(token, cache, checked=True).logits
        logp = _next_logp(model, logits[:, -1], bos_id)  # (B, V)
        best = logp.argmax(dim=-1)  # (B,)
        scores += torch.where(done, 0.0, logp.gather(1, best[:, None])[:, 0])
        out[:, t] = best
        done |= best == eos_id
        token = best[:, None]
        if bool(done.all()):  # the one host read per step, which stopping needs
            out = out[:, : t + 1]
            break
    hyps = []
    for row, score in zip(out.tolist(), scores.tolist(), strict=True):
        finished = eos_id in row
        hyps.append(Hypothesis(row[: row.index(eos_id)] if finished else row, score, finished))
    return hyps


def beam_search(
    model: IncrementalSeq2Seq[C],
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    length_penalty_alpha: float = 0.6,
    max_len: int | None = None,
    src_mask: Tensor | None = None,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """Batched beam search. src (B, S) -> for each row, its `n_best` hypotheses, best first.

    Each step expands every live beam, keeps the 2K best continuations, moves those ending in EOS (ranked
    within the best K) to the finished list, and keeps the K best others. A source stops once it has K
    finished hypotheses and no live beam could still beat the worst of them.
    """
    with evaluating(model), torch.no_grad():
        return _beam(model, src, bos_id, eos_id, beam_size, length_penalty_alpha, max_len, src_mask, n_best)


def _beam(
    model: IncrementalSeq2Seq[C],
    src: Tensor,
    bos_id: int,
    eos_id: int,
    beam_size: int,
    length_penalty_alpha: float,
    max_len: int | None,
    src_mask: Tensor | None,
    n_best: int,
) -> list[list[Hypothesis]]:
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in [1, beam_size={beam_size}], got {n_best}")
    k = beam_size
    _check_inputs(model, src, bos_id, eos_id)
    steps = _max_steps(model, max_len, src.shape[1])
    b, device = src.shape[0], src.device
    memory, memory_mask, _ = model.encode(src, src_mask=src_mask)
    # Cross-attention keys/values once per source, then repeated for its K beams.
    cache = model.start_cache(memory, memory_mask, capacity=steps).index_select(
        torch.arange(b, device=device).repeat_interleave(k)
    )
    scores = torch.full((b, k), float("-inf"), dtype=torch.float64, device=device)
    scores[:, 0] = 0.0  # all beams start as the same BOS: expand only one at the first step
    # (B*K, steps + 1), BOS first; column t + 1 is written at step t, earlier columns reordered in place
    history = torch.full((b * k, steps + 1), bos_id, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    done = [False] * b
    lp_max = length_penalty(steps, length_penalty_alpha)

    def norm(score: float, length: int) -> float:
        return score / length_penalty(length, length_penalty_alpha)

    for t in range(steps):
        logits = model.decode_step(history[:, t : t + 1], cache, checked=True).logits
        logp = _next_logp(model, logits[:, -1], bos_id)  # (B*K, V)
        v = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(b, k, v)).view(b, k * v)
        top_scores, top_idx = cand.topk(2 * k, dim=1)  # (B, 2K)
        top_beam, top_tok = top_idx // v, top_idx % v
        new_scores = torch.full((b, k), float("-inf"), dtype=torch.float64, device=device)
        new_src = torch.zeros(b, k, dtype=torch.long, device=device)
        new_tok = torch.full((b, k), eos_id, dtype=torch.long, device=device)
        ts, tb, tt = top_scores.tolist(), top_beam.tolist(), top_tok.tolist()
        hist = None
        for i in range(b):
            if done[i]:
                continue
            slot = 0
            for rank in range(2 * k):
                score, beam, tok = ts[i][rank], tb[i][rank], tt[i][rank]
                if score == float("-inf"):
                    break
                if tok == eos_id:
                    if rank < k:
                        if hist is None:
                            hist = history[:, 1 : t + 1].tolist()
                        finished[i].append(Hypothesis(hist[i * k + beam], score, True))
                    continue
                new_scores[i, slot], new_src[i, slot], new_tok[i, slot] = score, beam, tok
                slot += 1
                if slot == k:
                    break
            if len(finished[i]) >= k:
                # the K-th best finished score: what a live beam must beat to still matter
                worst = sorted((norm(h.score, len(h.tokens) + 1) for h in finished[i]), reverse=True)[k - 1]
                best_live = float(new_scores[i, 0])
                bound = best_live / lp_max if length_penalty_alpha > 0 else norm(best_live, t + 1)
                if bound <= worst:
                    done[i] = True
        if all(done):
            break
        scores = new_scores
        rows = (torch.arange(b, device=device)[:, None] * k + new_src).view(-1)  # (B*K,)
        history[:, : t + 1] = history[:, : t + 1].index_select(0, rows)
        history[:, t + 1] = new_tok.view(-1)
        # Beams move only within their source, whose K rows share one cross-attention cache: reorder only
        # the self-attention part, in place.
        cache.reorder_(rows)
    else:
        # Out of steps: live beams count as (unfinished) hypotheses.
        hist = history[:, 1:].tolist()
        sc = scores.tolist()
        for i in range(b):
            if done[i]:
                continue
            for j in range(k):
                if sc[i][j] != float("-inf"):
                    finished[i].append(Hypothesis(hist[i * k + j], sc[i][j], False))

    results = []
    for hyps in finished:
        hyps.sort(key=lambda h: norm(h.score, len(h.tokens) + int(h.finished)), reverse=True)
        results.append(hyps[:n_best])
    return results
