"""What a family gives the server (`Service`): its engine (run on the worker) and its endpoints, each a
body parser (JSON -> the engine's request, checked against the model: 4xx before any queueing) and the
JSON of a result, and for streaming the JSON of each text delta and of the end."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from tformer.serve.batching import StepEngine
from tformer.serve.schema import Body


@dataclass(frozen=True)
class Parsed:
    """A checked request: `key` groups the requests an engine may decode together."""

    key: Hashable
    request: Any
    stream: bool = False


@dataclass(frozen=True)
class Answer:
    """Who a response answers: its id and arrival time (Unix seconds), the same in every chunk of a stream."""

    id: str
    created: int


@dataclass(frozen=True)
class Stream:
    """Server-sent events of a streamed result: one chunk per text delta, then the last one (with the
    result's finish reason), then `data: [DONE]`."""

    delta: Callable[[str, Answer], object]
    last: Callable[[Any, Answer], object]


@dataclass(frozen=True)
class Endpoint:
    accepted: tuple[str, ...]  # the body's keys; any other is an unknown parameter
    parse: Callable[[Body], Parsed]
    reply: Callable[[Any, Answer], object]  # a result -> the response's JSON
    stream: Stream | None = None
    offload: bool = False  # parse in a thread (image decoding), not on the event loop


@dataclass
class Service:
    family: str
    name: str  # what the responses call the model (the checkpoint directory's name)
    engine: StepEngine
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # POST path -> endpoint
