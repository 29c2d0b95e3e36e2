"""The language model's endpoints, on one continuous batch (`TextGenerator.batch_decoder`: requests join
and leave between decoding steps, each row with its own cache length, parameters and seed):

- POST /v1/generate, `tformer generate`'s parameters: `{"prompt", "max_new_tokens", "temperature",
  "top_k", "top_p", "greedy", "seed", "stop", "stream"}` -> `{"text", "finish_reason", "prompt_tokens",
  "completion_tokens"}`.
- POST /v1/completions, OpenAI's: `{"model", "prompt", "max_tokens", "temperature" (0: greedy), "top_p",
  "stop", "seed", "stream"}` -> a `text_completion` object; `stream: true` sends its chunks as
  server-sent events and ends with `data: [DONE]`.

A prompt longer than the model's max_seq_len is refused (400), and so is asking for more than
MAX_TOKENS; past max_seq_len a row's window slides as `generate`'s does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tformer.inference.batching import BatchDecoder, GenerationRequest, StepEvent
from tformer.serve.batching import EventRows, Job
from tformer.serve.errors import RequestError
from tformer.serve.schema import Body
from tformer.serve.service import Answer, Endpoint, Parsed, Service, Stream
from tformer.tasks.lm import TextGenerator

GENERATE = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "greedy", "seed", "stop", "stream")
COMPLETIONS = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream")
MAX_STOPS = 4  # OpenAI's limit
SEEDS = 2**63 - 1
MAX_TOKENS = 4096  # tokens one request may ask for: a bound on the time it holds a row


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (a stop string or EOS) or "length" (max tokens)
    prompt_tokens: int
    completion_tokens: int


class LMEngine:
    """The worker's side: one `BatchDecoder` (made on the worker thread, which alone calls it)."""

    def __init__(
        self,
        generator: TextGenerator,
        *,
        max_batch: int,
        compile: bool | None,
        generated: Callable[[int], None],
    ) -> None:
        self.generator, self.max_batch, self.compile = generator, max_batch, compile
        self._decoder: BatchDecoder | None = None
        self._rows = EventRows(self._completion, generated)

    @staticmethod
    def _completion(job: Job, text: str, event: StepEvent) -> Completion:
        _, prompt_tokens = job.request
        return Completion(text, "length" if event.reason == "length" else "stop", prompt_tokens, event.tokens)

    def decoder(self) -> BatchDecoder:
        if self._decoder is None:
            self._decoder = self.generator.batch_decoder(max_batch=self.max_batch, compile=self.compile)
        return self._decoder

    @property
    def active(self) -> int:
        return len(self._rows)

    def admit(self, job: Job) -> list[Job]:
        request, _ = job.request
        self._rows.add(self.decoder().add(request), job)
        return []

    def cancel(self, job: Job) -> None:
        handle = self._rows.pop(job)
        if handle is not None:
            self.decoder().cancel(handle)  # type: ignore[arg-type]

    def step(self) -> list[Job]:
        return self._rows.feed(self.decoder().step(), key=lambda event: event.handle)

    def warm_up(self, max_batch: int) -> None:
        """A batch of one and a full batch, two tokens each, greedy and sampled: accel's row classes
        (1, 2-16, >16) for the prompt's pass and the steps, and the compiled one-row kernels."""
        decoder = self.decoder()
        for n in sorted({1, max_batch}):
            for i in range(n):
                decoder.add(GenerationRequest(prompt="", max_new_tokens=2, greedy=i % 2 == 0, seed=i))
            while len(decoder):
                decoder.step()


def _stop(body: Body) -> tuple[str, ...]:
    return body.texts("stop", max_items=MAX_STOPS, single=True)


def service(
    generator: TextGenerator,
    name: str,
    *,
    max_batch: int,
    compile: bool | None,
    generated: Callable[[int], None],
) -> Service:
    limit = generator.model.config.max_seq_len

    def prompt(body: Body) -> tuple[str, int]:
        text = body.text("prompt", what='the text to continue ("" starts from nothing)')
        n = len(generator.prompt_ids(text))
        if n > limit:
            raise RequestError(
                f"prompt has {n} tokens, more than the model's max_seq_len = {limit}; expected a shorter prompt",
                field="prompt",
            )
        return text, n

    def budget(body: Body, field: str, default: int) -> int:
        return body.integer(field, default, low=0, high=MAX_TOKENS)

    def parse_generate(body: Body) -> Parsed:
        text, n = prompt(body)
        request = GenerationRequest(
            prompt=text,
            max_new_tokens=budget(body, "max_new_tokens", 200),
            temperature=body.number("temperature", 0.8, low=0.0, high=100.0, above=True),
            top_k=body.integer("top_k", None, low=1, high=generator.model.config.vocab_size),
            top_p=body.number("top_p", 1.0, low=0.0, high=1.0, above=True) if body.present("top_p") else None,
            greedy=body.boolean("greedy", False),
            seed=body.integer("seed", None, low=0, high=SEEDS),
            stop=_stop(body),
        )
        return Parsed("lm", (request, n), body.boolean("stream", False))

    def parse_completions(body: Body) -> Parsed:
        if body.present("model"):
            body.text("model", what="the model's name (this server holds one)")
        text, n = prompt(body)
        temperature = body.number("temperature", 1.0, low=0.0, high=2.0)
        top_p = body.number("top_p", 1.0, low=0.0, high=1.0, above=True)
        request = GenerationRequest(
            prompt=text,
            max_new_tokens=budget(body, "max_tokens", 16),
            temperature=temperature if temperature > 0 else 1.0,
            top_p=None if top_p == 1.0 else top_p,
            greedy=temperature == 0,
            seed=body.integer("seed", None, low=0, high=SEEDS),
            stop=_stop(body),
        )
        return Parsed("lm", (request, n), body.boolean("stream", False))

    def generated_json(c: Completion, answer: Answer | None = None) -> dict[str, object]:
        return {
            "text": c.text,
            "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
        }

    endpoints = {
        "/v1/generate": Endpoint(
            GENERATE,
            parse_generate,
            reply=generated_json,
            stream=Stream(
                delta=lambda text, answer: {"text": text},
                last=lambda c, answer: {**generated_json(c), "text": ""},
            ),
        ),
        "/v1/completions": completions_endpoint(parse_completions, name),
    }
    engine = LMEngine(generator, max_batch=max_batch, compile=compile, generated=generated)
    return Service("lm", name, engine, endpoints)


def completions_endpoint(parse: Callable[[Body], Parsed], name: str) -> Endpoint:
    """OpenAI's text_completion objects: one per response, and per streamed chunk (same id and created)."""

    def head(answer: Answer) -> dict[str, Any]:
        return {
            "id": f"cmpl-{answer.id}",
            "object": "text_completion",
            "created": answer.created,
            "model": name,
        }

    def choice(text: str, finish_reason: str | None) -> list[dict[str, object]]:
        return [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]

    def reply(c: Completion, answer: Answer) -> dict[str, object]:
        usage = {
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        }
        return {**head(answer), "choices": choice(c.text, c.finish_reason), "usage": usage}

    stream = Stream(
        delta=lambda text, answer: {**head(answer), "choices": choice(text, None)},
        last=lambda c, answer: {**head(answer), "choices": choice("", c.finish_reason)},
    )
    return Endpoint(COMPLETIONS, parse, reply=reply, stream=stream)
