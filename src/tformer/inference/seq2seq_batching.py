"""Continuous batching of greedy (or sampled) translation: sources join and leave a running batch between
decoding steps, each decoded exactly as `greedy_decode` decodes it alone.

Each `step()` encodes the sources that joined (one padded encoder pass; their cross-attention keys/values
and source masks become rows of their own, `Seq2Seq.start_cache`), feeds their BOS, and feeds every running
row its last token in one pass over the shared `DecoderCache`, each row at its own target position; the
joined rows' caches are then appended (`DecoderCache.cat` pads each source's keys to the longest, masked).
A row stops at EOS or at its own step limit (`max_steps`: 2 S + 10 of its own source by default), and its
row is dropped at once. The tokens are greedy_decode's for that source alone, up to float32 rounding of the
batched products (a near tie it flips is the only way they part; scores then agree to ~1e-6).

Not thread-safe: one thread owns a decoder (the server's inference worker); the model is only read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tformer.data.batching import pad
from tformer.inference.batching import Reason, RowBatch, StepEvent
from tformer.inference.decoding import Sampler, choose, max_steps, next_logp, samplers
from tformer.inference.modes import evaluating
from tformer.inference.sampling import Sampling
from tformer.inference.streaming import TextStream
from tformer.models.decoder import DecoderCache
from tformer.models.seq2seq import Seq2Seq

if TYPE_CHECKING:
    from tformer.data.tokenizers import Tokenizer


@dataclass(frozen=True)
class TranslationRequest:
    """One source sentence; `max_len`: its output token limit (None: 2 S + 10, capped at max_seq_len);
    `sampling`: draw its tokens (None: greedy), as `Translator.translate(..., sampling=)` does alone."""

    text: str
    max_len: int | None = None
    sampling: Sampling | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"text must be a str, got {type(self.text).__name__}")
        if self.sampling is not None and not isinstance(self.sampling, Sampling):
            raise TypeError(f"sampling must be a Sampling or None, got {self.sampling!r}")
        n = self.max_len
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"max_len must be an int >= 1 or None, got {n!r}")


@dataclass
class _Row:
    handle: int
    src: list[int]
    steps: int  # this row's step limit
    stream: TextStream
    tokens: list[int]
    sampler: Sampler
    score: float = 0.0


class TranslationDecoder(RowBatch[_Row, DecoderCache]):
    """Greedy translation with continuous batching (module docstring): `add`, `step`, `cancel`, as the
    language model's `BatchDecoder`; a finished event carries the hypothesis's score (sum of
    log-probabilities, EOS included)."""

    def __init__(
        self, model: Seq2Seq, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, *, max_batch: int = 16
    ) -> None:
        if not isinstance(model, Seq2Seq):
            raise TypeError(
                f"batched greedy translation needs a Transformer Seq2Seq, got a {type(model).__name__} (the "
                "RNN baselines translate one batch at a time: Translator.translate)"
            )
        super().__init__(max_batch, next(model.parameters()).device)
        self.model, self.src_tok, self.tgt_tok = model, src_tokenizer, tgt_tokenizer

    def source_ids(self, text: str) -> list[int]:
        """The source ids of `text`; ValueError when empty or longer than max_seq_len."""
        ids = self.src_tok.encode(text)
        limit = self.model.config.max_seq_len
        if not ids:
            raise ValueError("text is empty: nothing to translate")
        if len(ids) > limit:
            raise ValueError(f"text has {len(ids)} tokens, more than the model's max_seq_len = {limit}")
        return ids

    def add(self, request: TranslationRequest) -> int:
        """Queue a source; -> its handle. It joins the batch at the next step with a free row."""
        if not isinstance(request, TranslationRequest):
            raise TypeError(f"add takes a TranslationRequest, got {type(request).__name__}")
        ids = self.source_ids(request.text)
        (steps,) = max_steps(self.model, request.max_len, [len(ids)])
        (sampler,) = samplers(request.sampling, 1, self.device)
        row = _Row(self._handle(), ids, steps, TextStream(), [], sampler)
        self._waiting.append(row)
        return row.handle

    def step(self) -> list[StepEvent]:
        """Encode the joining sources, decode one token for every running one; -> one event per request
        that ran (the text delta of its hypothesis so far; finished ones are gone after)."""
        joining = self._admit()
        if not self._running and not joining:
            return []
        with evaluating(self.model), torch.no_grad():
            logp = self._forward(joining)  # (B, V) float64
        best = choose(logp, [row.sampler for row in self._running])
        picked = logp.gather(1, best[:, None])[:, 0]
        events: list[StepEvent] = []
        finished: set[int] = set()
        eos = self.tgt_tok.eos_id
        for i, (row, token, score) in enumerate(
            zip(self._running, best.tolist(), picked.tolist(), strict=True)
        ):
            row.score += score
            reason: Reason | None = None
            if token == eos:
                reason = "eos"
            else:
                row.tokens.append(token)
                if len(row.tokens) >= row.steps:
                    reason = "length"
            text = self.tgt_tok.decode(row.tokens)
            delta = row.stream.finish(text) if reason else row.stream.update(text)[0]
            score_out = row.score if reason else None
            events.append(
                StepEvent(row.handle, delta, reason is not None, reason, len(row.tokens), score_out)
            )
            if reason:
                finished.add(i)
        self._drop(finished)
        return events

    def _forward(self, joining: list[_Row]) -> Tensor:
        """Next-token log-probabilities of the running rows (their last token over the shared cache), then
        of the joining ones (encoded together, BOS fed), whose cache rows are appended."""
        model, bos, parts = self.model, self.tgt_tok.bos_id, []
        if self._running:
            assert self._cache is not None
            last = torch.tensor([[row.tokens[-1]] for row in self._running], device=self.device)
            parts.append(
                next_logp(model, model.decode_step(last, self._cache, checked=True).logits[:, -1], bos)
            )
        if joining:
            src = pad([row.src for row in joining], self.src_tok.pad_id).to(self.device)  # (P, S)
            memory, memory_mask, _ = model.encode(src)
            cache = model.start_cache(memory, memory_mask)
            first = torch.full((len(joining), 1), bos, dtype=torch.long, device=self.device)
            parts.append(next_logp(model, model.decode_step(first, cache, checked=True).logits[:, -1], bos))
            self._cache = cache if self._cache is None else DecoderCache.cat([self._cache, cache])
            self._running += joining
        return torch.cat(parts)


__all__ = ["TranslationDecoder", "TranslationRequest"]
