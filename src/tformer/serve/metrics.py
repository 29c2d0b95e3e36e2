"""The server's Prometheus metrics, in a registry of its own (two apps in one process, as in the tests,
count apart): requests and errors by endpoint and status, latency, batch sizes, generated tokens and
tokens per second, queue and worker occupancy, readiness."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class TokenRate:
    """Tokens per second over the last `window` seconds; counted on the worker, read at each scrape."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._marks: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._marks.append((now, tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._marks and self._marks[0][0] < now - self.window:
            self._marks.popleft()

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._marks) / self.window


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "tformer_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"],
            registry=registry,
        )  # fmt: skip
        self.errors = Counter(
            "tformer_errors", "requests answered with a 4xx or 5xx status, by endpoint and status",
            ["endpoint", "status"], registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "tformer_request_seconds", "seconds from a request's arrival to its last byte, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch = Histogram(
            "tformer_batch_size", "requests decoded together: per batch, or per step of continuous batching",
            buckets=BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tokens = Counter(
            "tformer_generated_tokens", "tokens generated (language model and translation outputs)",
            registry=registry,
        )  # fmt: skip
        self.rate = TokenRate()
        Gauge(
            "tformer_tokens_per_second", f"tokens generated per second over the last {self.rate.window:g} s",
            registry=registry,
        ).set_function(self.rate.per_second)  # fmt: skip
        self.waiting = Gauge("tformer_queue_requests", "requests waiting for the worker", registry=registry)
        self.active = Gauge("tformer_active_requests", "requests in the worker", registry=registry)
        self.ready = Gauge("tformer_ready", "1 once warmed up (GET /health: 200)", registry=registry)
        self._info = Gauge(
            "tformer_info", "the served family and model", ["family", "model"], registry=registry
        )

    def info(self, family: str, model: str) -> None:
        self._info.labels(family, model).set(1)

    def generated(self, tokens: int) -> None:
        if tokens > 0:
            self.tokens.inc(tokens)
            self.rate.add(tokens)

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
