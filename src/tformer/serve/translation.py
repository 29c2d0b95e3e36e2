"""POST /v1/translate: one sentence per request, `{"text": ..., "beam_size": 4, "length_penalty": 0.6,
"max_tokens": null, "stream": false}` -> `{"translation": ...}`; `"sample": true` (with "temperature",
"top_k", "top_p", "seed") draws its tokens instead, one hypothesis.

Greedy and sampled requests (beam_size 1) join one continuous batch (`Translator.batch_decoder`: sources join and
leave between decoding steps). Beam requests with equal beam parameters are searched as one batch
(`Translator.beam_stream`), stepped alongside the greedy batch, so neither kind holds the other up; those
that arrive while a search of their parameters runs wait for it to end and start the next together. Either way each row keeps its own length limit, so a sentence gets what
it gets alone. Streamed, a request gets its greedy hypothesis as it grows, or under beam search the
prefix every live beam agrees on, as server-sent events; not streamed, the same text at once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import partial

from tformer.inference.batching import StepEvent
from tformer.inference.sampling import Sampling
from tformer.inference.seq2seq_batching import TranslationDecoder, TranslationRequest
from tformer.serve.batching import EventRows, Job
from tformer.serve.errors import RequestError
from tformer.serve.schema import Body
from tformer.serve.service import Endpoint, Parsed, Service, Stream
from tformer.tasks.translation import Translator

MAX_BEAM = 16
SAMPLING = ("temperature", "top_k", "top_p", "seed")  # with "sample": true only
ACCEPTED = ("text", "beam_size", "length_penalty", "max_tokens", "stream", "sample", *SAMPLING)
SEEDS = 2**63 - 1


@dataclass(frozen=True)
class Translate:
    """A checked request: greedy (beam_size 1), sampled (`sampling`; beam_size 1) or beam search."""

    text: str
    max_len: int | None
    beam_size: int
    length_penalty: float
    sampling: Sampling | None = None


def _row_key(search: int, event: StepEvent) -> tuple[int, int]:
    return search, event.handle


class TranslationEngine:
    """The worker's side: the greedy decoder (made on the worker thread) and the running beam searches,
    each a group of requests with equal (beam_size, length_penalty) that started at the same step."""

    def __init__(self, translator: Translator, *, max_batch: int, generated: Callable[[int], None]) -> None:
        self.translator, self.max_batch = translator, max_batch
        self._greedy: TranslationDecoder | None = None
        self._rows = EventRows(lambda job, text, event: text, generated)
        self._joining: list[Job] = []  # beam requests that start a search at the next step
        self._searches: dict[int, tuple[Iterator[list[StepEvent]], list[Hashable]]] = {}  # steps, row keys
        self._running: dict[int, tuple[int, float]] = {}  # search -> its (beam_size, length_penalty)
        self._next = 0

    def greedy(self) -> TranslationDecoder:
        if self._greedy is None:
            self._greedy = self.translator.batch_decoder(max_batch=self.max_batch)
        return self._greedy

    @property
    def active(self) -> int:
        return len(self._rows) + len(self._joining)

    def admit(self, job: Job) -> list[Job]:
        r: Translate = job.request
        if r.beam_size == 1:
            request = TranslationRequest(r.text, r.max_len, r.sampling)
            self._rows.add(("greedy", self.greedy().add(request)), job)
        else:
            self._joining.append(job)
        return []

    def cancel(self, job: Job) -> None:
        if job in self._joining:
            self._joining.remove(job)
            return
        key = self._rows.pop(job)
        if isinstance(key, tuple) and key[0] == "greedy":
            self.greedy().cancel(key[1])
        # a beam row is searched on with its group (its events are dropped); the others are not held up

    def _start_searches(self) -> None:
        """Beam requests wait while a search of their parameters runs, then start one together: one big
        search a step beats several small ones (the loopback benchmark: 2x the requests/s)."""
        groups: dict[tuple[int, float], list[Job]] = {}
        waiting = []
        for job in self._joining:
            params = job.request.beam_size, job.request.length_penalty
            if params in self._running.values():
                waiting.append(job)
            else:
                groups.setdefault(params, []).append(job)
        self._joining = waiting
        for (beam_size, length_penalty), jobs in groups.items():
            search, self._next = self._next, self._next + 1
            steps = self.translator.beam_stream(
                [j.request.text for j in jobs],
                beam_size=beam_size,
                length_penalty=length_penalty,
                max_len=[j.request.max_len for j in jobs],  # None: each row's own default
            )
            self._searches[search] = steps, [(search, i) for i in range(len(jobs))]
            self._running[search] = (beam_size, length_penalty)
            for key, job in zip(self._searches[search][1], jobs, strict=True):
                self._rows.add(key, job)

    def step(self) -> list[Job]:
        self._start_searches()
        left = []
        if self._greedy is not None and len(self._greedy):
            left += self._rows.feed(self._greedy.step(), key=lambda event: ("greedy", event.handle))
        for search, (steps, keys) in list(self._searches.items()):
            events = next(steps, None)
            if events is not None:
                left += self._rows.feed(events, key=partial(_row_key, search))
            if events is None or not any(key in self._rows for key in keys):
                del self._searches[search], self._running[search]  # done, or every request of it gone

        return left

    def warm_up(self, max_batch: int) -> None:
        """Greedy and beam 4 at one sentence and at `max_batch`: every row class accel tunes (1, 2-16, >16)."""
        t = self.translator
        vocab, limit = t.src_tok.vocab_size, t.model.config.max_seq_len
        text = t.src_tok.decode([4 + i % max(1, vocab - 4) for i in range(min(8, limit))]) or "a"
        for n in sorted({1, max_batch}):
            decoder = t.batch_decoder(max_batch=n)
            for _ in range(n):
                decoder.add(TranslationRequest(text, 4))
            while len(decoder):
                decoder.step()
            for _ in t.beam_stream([text] * n, beam_size=4, max_len=4):
                pass


def service(
    translator: Translator, name: str, *, max_batch: int, generated: Callable[[int], None]
) -> Service:
    limit = translator.model.config.max_seq_len

    def parse(body: Body) -> Parsed:
        text = body.text("text", what="the sentence to translate")
        n = len(translator.src_tok.encode(text))
        if n == 0:
            raise RequestError("text has no tokens; expected a sentence to translate", field="text")
        if n > limit:
            raise RequestError(
                f"text has {n} tokens, more than the model's max_seq_len = {limit}; expected a shorter sentence",
                field="text",
            )
        sampled = body.boolean("sample", False)
        beam = body.integer("beam_size", 1 if sampled else 4, low=1, high=MAX_BEAM)
        length_penalty = body.number("length_penalty", 0.6, low=0.0, high=10.0)
        max_len = body.integer("max_tokens", None, low=1, high=limit)
        stream = body.boolean("stream", False)
        return Parsed(beam, Translate(text, max_len, beam, length_penalty, sampling(body)), stream)

    def sampling(body: Body) -> Sampling | None:
        """`"sample": true` draws the tokens (temperature, top_k, top_p, seed), one hypothesis."""
        if not body.boolean("sample", False):
            for name in SAMPLING:
                if body.present(name):
                    raise RequestError(f'{name} is for sampling; expected it with "sample": true', field=name)
            return None
        if body.integer("beam_size", 1, low=1, high=MAX_BEAM) != 1:
            raise RequestError(
                'sampling draws one hypothesis; expected beam_size 1 (or none) with "sample": true',
                field="beam_size",
            )
        return Sampling(
            temperature=body.number("temperature", 1.0, low=0.0, high=100.0, above=True),
            top_k=body.integer("top_k", None, low=1, high=translator.tgt_tok.vocab_size),
            top_p=body.number("top_p", 1.0, low=0.0, high=1.0, above=True) if body.present("top_p") else None,
            seed=body.integer("seed", None, low=0, high=SEEDS),
        )

    endpoint = Endpoint(
        ACCEPTED,
        parse,
        reply=lambda text, answer: {"translation": text},
        stream=Stream(
            delta=lambda text, answer: {"delta": text}, last=lambda text, answer: {"translation": text}
        ),
    )
    engine = TranslationEngine(translator, max_batch=max_batch, generated=generated)
    return Service("translation", name, engine, {"/v1/translate": endpoint})
