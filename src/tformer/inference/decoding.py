"""Autoregressive decoding of an encoder-decoder: greedy and batched beam search, both incremental.

The source is encoded once; every decoder layer's cross-attention keys/values are computed once per
source (`Seq2Seq.start_cache`; any `IncrementalSeq2Seq`, RNNSeq2Seq too); each step feeds one token and writes its self-attention keys and values
into static buffers of `max_len` positions, allocated once (beam search reorders them in place). Scores are sums of token log-probabilities (EOS included); beam search ranks finished hypotheses
by score / lp(length), with GNMT's lp(n) = ((5 + n) / 6) ** length_penalty (Wu et al., 2016).

Both run the model in eval mode; a model already in it is not written to, so threads may share it
(tformer.inference.modes).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor, nn

from tformer.attention.kv_cache import DecodingCache
from tformer.config import Seq2SeqConfig
from tformer.inference.modes import evaluating
from tformer.inference.sampling import Sampling, new_generator
from tformer.models.seq2seq import Seq2SeqOutput

C = TypeVar("C", bound=DecodingCache)
Sampler = tuple[Sampling, torch.Generator] | None  # a row's sampling and its own generator (None: greedy)


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


MaxLen = int | Sequence[int | None] | None


def source_lengths(model: IncrementalSeq2Seq[C], src: Tensor, src_mask: Tensor | None) -> list[int]:
    """Each row's real source length: its True entries of `src_mask`, or its non-padding ids."""
    real = (src != model.config.pad_id) if src_mask is None else src_mask
    lengths: list[int] = real.sum(dim=1).tolist()
    return lengths


def max_steps(model: IncrementalSeq2Seq[C], max_len: MaxLen, lengths: Sequence[int]) -> list[int]:
    """Each row's step limit: `max_len` (one int, or one per row), where None (for all, or a row's entry)
    is 2 S + 10 of the row's own unpadded source length S, so a sentence decodes as far batched as alone;
    capped at max_seq_len."""
    limit = model.config.max_seq_len
    per_row = [max_len] * len(lengths) if max_len is None or isinstance(max_len, int) else list(max_len)
    if len(per_row) != len(lengths):
        raise ValueError(f"max_len has {len(per_row)} entries; expected one per source ({len(lengths)})")
    steps = []
    for value, n in zip(per_row, lengths, strict=True):
        if value is None:  # this row's own default
            value = 2 * n + 10
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_len must be an int >= 1 or None (or one per source), got {value!r}")
        steps.append(min(value, limit))
    return steps


def next_logp(model: IncrementalSeq2Seq[C], logits: Tensor, bos_id: int) -> Tensor:
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
    max_len: MaxLen = None,
    src_mask: Tensor | None = None,
    sampling: Sampling | Sequence[Sampling | None] | None = None,
) -> list[Hypothesis]:
    """Pick the most probable token at each step. src (B, S) -> one hypothesis per row. `max_len`: one
    limit for every row, one per row, or None (each row's own default, `max_steps`). `sampling` (for all
    rows, or one per row, None: greedy): draw each token instead, from the row's own generator, so a row
    samples the same tokens batched as alone; scores stay the untempered log-probabilities."""
    with evaluating(model), torch.no_grad():
        return _greedy(model, src, bos_id, eos_id, max_len, src_mask, sampling)


def samplers(
    sampling: Sampling | Sequence[Sampling | None] | None, b: int, device: torch.device
) -> list[Sampler]:
    """One (Sampling, its own generator) per row that samples, None for a greedy row."""
    per_row = [sampling] * b if sampling is None or isinstance(sampling, Sampling) else list(sampling)
    if len(per_row) != b:
        raise ValueError(f"sampling has {len(per_row)} entries; expected one per source ({b})")
    for s in per_row:
        if s is not None and not isinstance(s, Sampling):
            raise TypeError(f"sampling must be a Sampling or None (or one per source), got {s!r}")
    return [None if s is None else (s, new_generator(s.seed, device)) for s in per_row]


def choose(logp: Tensor, rows: Sequence[Sampler], skip: Sequence[bool] | None = None) -> Tensor:
    """(B, V) log-probabilities -> (B,) next tokens: the argmax, or a draw for each sampling row (rows in
    `skip`, already finished, draw nothing)."""
    best = logp.argmax(dim=-1)
    for i, row in enumerate(rows):
        if row is not None and not (skip is not None and skip[i]):
            best[i] = row[0].draw(logp[i : i + 1], row[1])[0]
    return best


def _greedy(
    model: IncrementalSeq2Seq[C],
    src: Tensor,
    bos_id: int,
    eos_id: int,
    max_len: MaxLen,
    src_mask: Tensor | None,
    sampling: Sampling | Sequence[Sampling | None] | None,
) -> list[Hypothesis]:
    _check_inputs(model, src, bos_id, eos_id)
    rows = samplers(sampling, src.shape[0], src.device)
    sampled = any(r is not None for r in rows)
    row_steps = max_steps(model, max_len, source_lengths(model, src, src_mask))
    steps = max(row_steps)
    limits = torch.tensor(row_steps, device=src.device)  # (B,)
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
        logp = next_logp(model, logits[:, -1], bos_id)  # (B, V)
        best = choose(logp, rows, done.tolist()) if sampled else logp.argmax(dim=-1)  # (B,)
        scores += torch.where(done, 0.0, logp.gather(1, best[:, None])[:, 0])
        out[:, t] = best
        done |= (best == eos_id) | (limits <= t + 1)  # EOS, or the row's own step limit reached
        token = best[:, None]
        if bool(done.all()):  # the one host read per step, which stopping needs
            out = out[:, : t + 1]
            break
    hyps = []
    for row, score, n in zip(out.tolist(), scores.tolist(), row_steps, strict=True):
        row = row[:n]
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
    max_len: MaxLen = None,
    src_mask: Tensor | None = None,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """Batched beam search. src (B, S) -> for each row, its `n_best` hypotheses, best first. `max_len` as
    for `greedy_decode`: each row stops at its own limit, so a source decodes as it would alone.

    Each step expands every live beam, keeps the 2K best continuations, moves those ending in EOS (ranked
    within the best K) to the finished list, and keeps the K best others. A source stops once it has K
    finished hypotheses and no live beam could still beat the worst of them.
    """
    with evaluating(model), torch.no_grad():
        search = beam_steps(
            model, src, bos_id=bos_id, eos_id=eos_id, beam_size=beam_size,
            length_penalty_alpha=length_penalty_alpha, max_len=max_len, src_mask=src_mask, n_best=n_best,
        )  # fmt: skip
        while True:
            try:
                next(search)
            except StopIteration as end:
                results: list[list[Hypothesis]] = end.value
                return results


class BeamProgress(NamedTuple):
    """One source after a beam-search step: the tokens every live beam and the best finished hypothesis
    share (so the final best starts with them), or, once the source is done, its best hypothesis."""

    tokens: list[int]
    best: Hypothesis | None  # set once the source is done (its tokens are then `tokens`)


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    first = seqs[0]
    n = len(first)
    for seq in seqs[1:]:
        n = min(n, len(seq))
        for j in range(n):
            if seq[j] != first[j]:
                n = j
                break
    return first[:n]


def beam_steps(
    model: IncrementalSeq2Seq[C],
    src: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    length_penalty_alpha: float = 0.6,
    max_len: MaxLen = None,
    src_mask: Tensor | None = None,
    n_best: int = 1,
    progress: bool = False,
) -> Generator[list[BeamProgress], None, list[list[Hypothesis]]]:
    """`beam_search` one step at a time (streaming): yields after each step, with `progress`, one
    `BeamProgress` per source (else an empty list), and returns beam_search's result. The caller runs
    each step under torch.no_grad() (grad mode is not held across a yield) with the model in eval mode."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in [1, beam_size={beam_size}], got {n_best}")
    k = beam_size
    _check_inputs(model, src, bos_id, eos_id)
    row_steps = max_steps(model, max_len, source_lengths(model, src, src_mask))
    steps = max(row_steps)
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
    lp_max = [length_penalty(n, length_penalty_alpha) for n in row_steps]  # each row's largest penalty

    def norm(score: float, length: int) -> float:
        return score / length_penalty(length, length_penalty_alpha)

    def ranked(hyps: list[Hypothesis]) -> list[Hypothesis]:
        """Best first by length-normalised score (EOS counted in the length)."""
        return sorted(hyps, key=lambda h: norm(h.score, len(h.tokens) + int(h.finished)), reverse=True)

    for t in range(steps):
        logits = model.decode_step(history[:, t : t + 1], cache, checked=True).logits
        logp = next_logp(model, logits[:, -1], bos_id)  # (B*K, V)
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
                bound = best_live / lp_max[i] if length_penalty_alpha > 0 else norm(best_live, t + 1)
                if bound <= worst:
                    done[i] = True
        rows: Tensor | None = None
        if not all(done):
            scores = new_scores
            rows = (torch.arange(b, device=device)[:, None] * k + new_src).view(-1)  # (B*K,)
            history[:, : t + 1] = history[:, : t + 1].index_select(0, rows)
            history[:, t + 1] = new_tok.view(-1)
            out_of_steps = [i for i in range(b) if not done[i] and row_steps[i] == t + 1]
            if out_of_steps:  # these rows' live beams count as (unfinished) hypotheses
                hist, sc = history[:, 1 : t + 2].tolist(), scores.tolist()
                for i in out_of_steps:
                    finished[i].extend(
                        Hypothesis(hist[i * k + j], sc[i][j], False)
                        for j in range(k)
                        if sc[i][j] != float("-inf")
                    )
                    done[i] = True
        if progress:
            hist, sc = history[:, 1 : t + 2].tolist(), scores.tolist()
            report = []
            for i in range(b):
                if done[i]:
                    best = ranked(finished[i])[0] if finished[i] else Hypothesis([], float("-inf"), False)
                    report.append(BeamProgress(best.tokens, best))
                else:
                    # the final best extends a live beam, or is the best finished hypothesis so far (a
                    # finished one ranked below it never becomes the best: that one stays in the list)
                    seqs = [hist[i * k + j] for j in range(k) if sc[i][j] != float("-inf")]
                    if finished[i]:
                        seqs.append(ranked(finished[i])[0].tokens)
                    report.append(BeamProgress(_common_prefix(seqs), None))
            yield report
        else:
            yield []
        if all(done) or rows is None:
            break
        # Beams move only within their source, whose K rows share one cross-attention cache: reorder only
        # the self-attention part, in place.
        cache.reorder_(rows)

    return [ranked(hyps)[:n_best] for hyps in finished]
