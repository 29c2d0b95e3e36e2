"""Continuous batching of text generation: many requests decoded together, joining and leaving between
steps, each with its own parameters, each giving exactly what it gives alone.

`BatchDecoder.add(request)` queues a request; every `step()` first reads the prompts of the requests
that joined (one right-padded forward pass of their own, `LanguageModel.forward(lengths=...)`, whose cache
rows are then appended to the running batch's, `LMCache.cat`), and decodes one token for every running
request from one (B, 1) pass over the shared cache, each row at its own position. A finished or cancelled
request's row is dropped at once (`LMCache.index_select`), so the batch is only ever as wide as the
requests still running.

Each request follows `TextGenerator.generate` step for step: the same prompt ids (BOS for an empty
prompt; the last max_seq_len tokens of a longer one), its own `torch.Generator` seeded as there, the same
filtering and draw on its own row of logits, and the same window re-read when its context reaches
max_seq_len. Its tokens are therefore the ones it gets alone, up to the float32 rounding of a batched
product (a near tie that rounding flips is the only way two runs can part), and its text deltas (from
`TextStream`) join to the same text.

Not thread-safe: one thread owns a decoder and calls add / step / cancel (the server's inference worker).
The model, in eval mode, is only read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

import torch
from torch import Tensor

from tformer.accel import compiled_decoding, decoding_setting
from tformer.inference.modes import evaluating
from tformer.inference.sampling import check_compile, check_sampling, new_generator, sample
from tformer.inference.streaming import Continuation, TextStream
from tformer.models.lm import LanguageModel, LMCache

if TYPE_CHECKING:
    from tformer.data.tokenizers import Tokenizer

Reason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and how to continue it, as `TextGenerator.generate` takes them (checked here, so a bad
    request fails at `add`, naming the field)."""

    prompt: str
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a str, got {type(self.prompt).__name__}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {n!r}")
        if not isinstance(self.greedy, bool):
            raise TypeError(f"greedy must be a bool, got {self.greedy!r}")
        check_sampling(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            greedy=self.greedy,
        )
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must be a sequence of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class StepEvent:
    """What one step did for one request: the new text (may be "" while text is held back), whether it
    finished and why, how many tokens it has generated so far, and (a finished translation) the
    hypothesis's score, its sum of log-probabilities."""

    handle: int
    text: str
    finished: bool
    reason: Reason | None = None
    tokens: int = 0
    score: float | None = None


@dataclass
class _Row:
    handle: int
    request: GenerationRequest
    ids: list[int]  # prompt (as fed) then every generated token
    text: Continuation
    stream: TextStream
    generator: torch.Generator
    generated: int = 0
    cached: int = 0  # positions of this row in the cache
    feed: list[int] | None = None  # ids to read into a fresh cache row at the next step


class HasHandle(Protocol):
    handle: int


class RowCache(Protocol):
    """A model cache whose rows a continuous batch drops (LMCache, DecoderCache)."""

    @property
    def batch_size(self) -> int: ...

    def index_select(self: K, index: Tensor) -> K: ...


R = TypeVar("R", bound=HasHandle)
K = TypeVar("K", bound=RowCache)


class RowBatch(Generic[R, K]):
    """What the continuous-batching decoders share: the running rows (in their cache's row order), the
    requests waiting for a row (first come first served), handles, cancelling, dropping rows."""

    def __init__(self, max_batch: int, device: torch.device) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.max_batch, self.device = max_batch, device
        self._running: list[R] = []
        self._waiting: deque[R] = deque()
        self._cache: K | None = None
        self._next = 0

    @property
    def running(self) -> int:
        """Requests holding a row."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def free(self) -> int:
        return self.max_batch - self.running

    def __len__(self) -> int:
        return self.running + self.waiting

    def _handle(self) -> int:
        self._next += 1
        return self._next - 1

    def _admit(self) -> list[R]:
        """The waiting requests that get the free rows now."""
        rows: list[R] = []
        while self._waiting and len(rows) < self.free:
            rows.append(self._waiting.popleft())
        return rows

    def cancel(self, handle: int) -> bool:
        """Drop a request wherever it is (its row is freed now); False when it is not here (finished)."""
        for row in self._waiting:
            if row.handle == handle:
                self._waiting.remove(row)
                return True
        for i, row in enumerate(self._running):
            if row.handle == handle:
                self._drop({i})
                return True
        return False

    def _drop(self, rows: set[int]) -> None:
        keep = [i for i in range(len(self._running)) if i not in rows]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = None
        elif self._cache is not None and len(keep) < self._cache.batch_size:
            self._cache = self._cache.index_select(torch.tensor(keep, device=self.device))


class BatchDecoder(RowBatch[_Row, LMCache]):
    """Continuous batching over a `LanguageModel` (see the module docstring): `add`, `step`, `cancel`.

    `max_batch` bounds the rows decoded together; further requests wait, first come first served. `compile`
    is `generate`'s (compiled one-row kernels; None: where this machine measured them faster, alone and in
    this model's decoding step)."""

    def __init__(
        self, model: LanguageModel, tokenizer: Tokenizer, *, max_batch: int = 16, compile: bool | None = None
    ) -> None:
        if not isinstance(model, LanguageModel):
            raise TypeError(
                f"batched decoding needs a Transformer LanguageModel with a per-row KV cache, got a "
                f"{type(model).__name__} (the RNN baselines decode one request at a time: TextGenerator.generate)"
            )
        check_compile(model, compile)
        super().__init__(max_batch, next(model.parameters()).device)
        self.model, self.tok, self.compile = model, tokenizer, decoding_setting(model, compile)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids generation starts from: the prompt's, or BOS for an empty one."""
        return self.tok.encode(prompt) or [self.tok.bos_id]

    def add(self, request: GenerationRequest) -> int:
        """Queue a request; -> its handle. It joins the batch at the next step with a free row."""
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"add takes a GenerationRequest, got {type(request).__name__}")
        ids = self.prompt_ids(request.prompt)
        row = _Row(
            self._handle(), request, ids, Continuation(self.tok, ids), TextStream(request.stop),
            new_generator(request.seed, self.device),
        )  # fmt: skip
        self._waiting.append(row)
        return row.handle

    # --- one step ------------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        """Read the prompts of joining requests, decode one token for every running one; -> one event per
        request that ran (finished ones are gone after)."""
        events: list[StepEvent] = []
        limit = self.model.config.max_seq_len
        joining: list[_Row] = []
        for row in self._admit():
            if row.request.max_new_tokens == 0:  # nothing to generate: its text is final now
                events.append(StepEvent(row.handle, row.stream.finish(row.text(row.ids)), True, "length"))
                continue
            row.feed = row.ids[-limit:]  # generate reads the last max_seq_len tokens of a long prompt
            joining.append(row)
        # a row whose context filled max_seq_len re-reads its last half window, as `generate` does
        full = {i for i, row in enumerate(self._running) if row.cached >= limit}
        for i in sorted(full):
            row = self._running[i]
            row.feed = row.ids[-(limit // 2) :]
            joining.append(row)
        self._drop(full)
        if not self._running and not joining:
            return events
        with evaluating(self.model), torch.no_grad(), compiled_decoding(self.compile):
            logits = self._forward(joining)
        tokens = self._choose(logits)
        finished: set[int] = set()
        eos = self.tok.eos_id
        for i, (row, token) in enumerate(zip(self._running, tokens, strict=True)):
            row.ids.append(token)
            row.generated += 1
            delta, stopped = row.stream.update(row.text(row.ids))
            reason: Reason | None = "stop" if stopped else None
            if reason is None and token == eos:
                reason = "eos"
            elif reason is None and row.generated >= row.request.max_new_tokens:
                reason = "length"
            if reason is not None and not stopped:
                delta += row.stream.finish(row.text(row.ids))
            events.append(StepEvent(row.handle, delta, reason is not None, reason, row.generated))
            if reason is not None:
                finished.add(i)
        self._drop(finished)
        return events

    def _forward(self, joining: list[_Row]) -> Tensor:
        """Logits (B, V) float32 of every row's next token: running rows first (one token each over the
        shared cache), then the joining rows (their prompts, right-padded, into a cache of their own that
        is appended to the shared one)."""
        parts: list[Tensor] = []
        if self._running:
            assert self._cache is not None
            last = torch.tensor([[row.ids[-1]] for row in self._running], device=self.device)  # (B, 1)
            out = self.model(last, cache=self._cache, last_only=True, checked=True)
            parts.append(out.logits[:, -1].float())
            for row in self._running:
                row.cached += 1
        if joining:
            feeds = [row.feed or [] for row in joining]
            width = max(len(f) for f in feeds)
            ids = torch.tensor([f + [self.tok.pad_id] * (width - len(f)) for f in feeds], device=self.device)
            cache = self.model.new_cache()
            out = self.model(ids, cache=cache, last_only=True, lengths=[len(f) for f in feeds])
            parts.append(out.logits[:, -1].float())
            self._cache = cache if self._cache is None else LMCache.cat([self._cache, cache])
            for row, f in zip(joining, feeds, strict=True):
                row.cached, row.feed = len(f), None
            self._running += joining
        return torch.cat(parts)

    def _choose(self, logits: Tensor) -> list[int]:
        """Each row's next token from its own row of logits, as `generate` picks it alone."""
        chosen = logits.argmax(dim=-1)  # (B,): the greedy rows' choice
        for i, row in enumerate(self._running):
            r = row.request
            if not r.greedy:
                chosen[i] = sample(
                    logits[i : i + 1], row.generator, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p
                )[0]
        tokens: list[int] = chosen.tolist()
        return tokens


__all__ = ["BatchDecoder", "GenerationRequest", "RowBatch", "StepEvent"]
