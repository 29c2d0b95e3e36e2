"""What a server is told (`tformer serve`'s options other than where to listen and what to load), checked
once when made so that a bad value is one error naming its option."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeOptions:
    """max_batch: requests decoded together (rows of the LM's continuous batch); max_wait_ms: how long a
    request may wait for others to join its batch while the worker is idle; timeout_s: a request's limit
    from arrival to its last byte (504 past it); max_body_bytes: larger bodies are refused (413);
    api_key: the bearer token every endpoint but /health wants (None: no auth); compile: the LM's
    compiled decoding kernels as `tformer generate --compile` (None: where this machine measured them
    faster); warm_up: run every batch size once before /health says ready."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    timeout_s: float = 60.0
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    compile: bool | None = None
    warm_up: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 1024:
            raise ValueError(f"--max-batch {self.max_batch}: expected 1 to 1024 requests")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ValueError(f"--max-wait-ms {self.max_wait_ms}: expected 0 to 10000 milliseconds")
        if not 0 < self.timeout_s <= 86_400:
            raise ValueError(f"--timeout {self.timeout_s}: expected seconds in (0, 86400]")
        if not 1024 <= self.max_body_bytes <= 1 << 30:
            raise ValueError(f"--max-body-bytes {self.max_body_bytes}: expected 1024 to 2**30 bytes")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty; give a token, or leave the option out for no auth")
