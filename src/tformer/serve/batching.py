"""Dynamic batching: requests wait on the event loop (`Batcher`) until the one inference thread (`Worker`,
which owns the model: every model call is made there) has room, and go to it together.

The worker holds at most `max_batch` jobs and steps its engine while it has any: jobs join between steps
and leave when they finish. For the language model a step is one token of every running row
(continuous batching over the KV cache); for the families without step-level decoding
(`BatchAtATime`: classification, images) a step decodes every admitted job to its end, and what arrives
meanwhile waits in the worker's inbox to form the next batch. While the worker is idle the batcher
waits up to `max_wait` after the first request's arrival for others to join it; while it is busy it
hands requests on as soon as rows are free (a step is coming anyway).

Rows are counted on the event loop only (`Batcher.free`); the worker gives rows back through
`loop.call_soon_threadsafe`, as it reports results, so the two threads share no lock. A job marked
`cancelled` (its client went away, or its time ran out) is dropped before it reaches the model, or
cancelled between two steps, which frees its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from tformer.inference.batching import StepEvent
from tformer.serve.errors import RequestError


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: object) -> None:
    """`fn(*args)` on the loop, from the worker thread; nothing once the loop is closed (nobody waits)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class Job:
    """One request on its way through the batcher and the worker. Made on the event loop; the worker
    reports back only through `loop.call_soon_threadsafe` (`emit`, `finish`, `fail`)."""

    def __init__(
        self, key: Hashable, request: Any, *, loop: asyncio.AbstractEventLoop, timeout_s: float, stream: bool
    ) -> None:
        self.key, self.request, self.loop = key, request, loop
        self.arrived = loop.time()
        self.deadline = self.arrived + timeout_s
        self.result: asyncio.Future[Any] = loop.create_future()
        self.stream = stream
        self.deltas: deque[str] = deque()  # streamed text not yet sent (loop side)
        self.news = asyncio.Event()  # set by each delta and by the result
        self.cancelled = False  # written on the loop (client gone, time out), read by the worker

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        call_soon(self.loop, fn, *args)

    def emit(self, delta: str) -> None:
        """Worker side: a piece of streamed text (the loop runs these before the `finish` after them)."""
        if self.stream and delta:
            self._call(self._push, delta)

    def finish(self, value: object) -> None:
        """Worker side: the result."""
        self._call(self._settle, value, None)

    def fail(self, error: BaseException) -> None:
        self._call(self._settle, None, error)

    def _push(self, delta: str) -> None:
        self.deltas.append(delta)
        self.news.set()

    def _settle(self, value: object, error: BaseException | None) -> None:
        self.news.set()
        if self.result.done() or (error is not None and self.cancelled):  # nobody would read it
            return
        if error is None:
            self.result.set_result(value)
        else:
            self.result.set_exception(error)


class StepEngine(Protocol):
    """A family on the worker: jobs join (`admit`) and leave between steps. `admit`, `step` and `cancel`
    report to the jobs themselves (`emit`, `finish`, `fail`); `admit` and `step` return the jobs that
    left (finished or failed), whose rows the worker gives back."""

    @property
    def active(self) -> int: ...

    def admit(self, job: Job) -> list[Job]: ...

    def step(self) -> list[Job]: ...

    def cancel(self, job: Job) -> None: ...

    def warm_up(self, max_batch: int) -> None:
        """Decode each batch size class up to `max_batch` once (accel's tuning, compiled kernels)."""
        ...


class BatchAtATime(ABC):
    """A `StepEngine` whose step decodes every admitted job to its end, the jobs of one key in one `run`
    call: the families without step-level decoding (classification, images). While a step runs, new jobs
    collect in the worker's inbox and form the next batch."""

    def __init__(self) -> None:
        self._jobs: list[Job] = []

    @abstractmethod
    def run(self, key: Hashable, jobs: list[Job]) -> Sequence[object]:
        """The results of `jobs` (all of key `key`), in order; a streaming job may `emit` on the way."""

    @abstractmethod
    def warm_up(self, max_batch: int) -> None: ...

    @property
    def active(self) -> int:
        return len(self._jobs)

    def admit(self, job: Job) -> list[Job]:
        self._jobs.append(job)
        return []

    def cancel(self, job: Job) -> None:
        self._jobs = [j for j in self._jobs if j is not job]

    def step(self) -> list[Job]:
        jobs, self._jobs = self._jobs, []
        groups: dict[Hashable, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        for key, group in groups.items():
            try:
                results = self.run(key, group)
            except Exception as exc:
                error = as_request_error(exc)
                for job in group:
                    job.fail(error)
                continue
            for job, result in zip(group, results, strict=True):
                job.finish(result)
        return jobs


@dataclass
class _Progress:
    job: Job
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0


class EventRows:
    """The jobs of decoders that report `StepEvent`s (the LM's BatchDecoder, the translator's greedy
    decoder and beam streams), each under a key its engine chooses: every event's text goes to its job's
    stream and into its result, `finish(job, text, event)` makes the result, and `generated(n)` counts
    the tokens."""

    def __init__(
        self, finish: Callable[[Job, str, StepEvent], object], generated: Callable[[int], None]
    ) -> None:
        self._finish, self._generated = finish, generated
        self._rows: dict[Hashable, _Progress] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._rows

    def add(self, key: Hashable, job: Job) -> None:
        self._rows[key] = _Progress(job)

    def pop(self, job: Job) -> Hashable | None:
        """Forget `job` (cancelled); -> its key, None when it is not here."""
        for key, row in self._rows.items():
            if row.job is job:
                del self._rows[key]
                return key
        return None

    def feed(self, events: Iterable[StepEvent], key: Callable[[StepEvent], Hashable]) -> list[Job]:
        """Hand each event to its job; -> the jobs that finished. Events of forgotten jobs are dropped."""
        left = []
        for event in events:
            k = key(event)
            row = self._rows.get(k)
            if row is None:
                continue
            self._generated(event.tokens - row.tokens)
            row.tokens = event.tokens
            if event.text:
                row.pieces.append(event.text)
                row.job.emit(event.text)
            if event.finished:
                row.job.finish(self._finish(row.job, "".join(row.pieces), event))
                del self._rows[k]
                left.append(row.job)
        return left


def internal_error(exc: BaseException) -> RequestError:
    """An exception no check foresaw: logged with its traceback, answered as a 500 without details."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return RequestError(
        f"internal error ({type(exc).__name__}); the server logged it and goes on serving", status=500
    )


def as_request_error(exc: Exception) -> RequestError:
    return exc if isinstance(exc, RequestError) else internal_error(exc)


class Worker:
    """The inference thread: warms the engine up, then admits what the batcher submits and steps the
    engine while it has jobs, until `stop`. `release(n)` gives n rows back to the batcher and
    `ready(failure)` says the warm-up is over; both are called on the loop."""

    def __init__(
        self,
        engine: StepEngine,
        *,
        max_batch: int,
        warm_up: bool,
        loop: asyncio.AbstractEventLoop,
        release: Callable[[int], None],
        ready: Callable[[BaseException | None], None],
        observe_batch: Callable[[int], None],
    ) -> None:
        self.engine, self.max_batch = engine, max_batch
        self._warm, self._loop = warm_up, loop
        self._release, self._ready, self._observe = release, ready, observe_batch
        self._inbox: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        self._jobs: list[Job] = []
        self.thread = threading.Thread(target=self._run, name="tformer-serve-worker", daemon=True)

    @property
    def jobs(self) -> tuple[Job, ...]:
        """The jobs in the worker now: a snapshot (the worker thread changes the list)."""
        return tuple(self._jobs)

    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        self._inbox.put(jobs)

    def stop(self) -> None:
        """Finish everything submitted (every active job too), then end the thread."""
        self._inbox.put(None)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        call_soon(self._loop, fn, *args)

    def _run(self) -> None:
        failure: BaseException | None = None
        if self._warm:
            try:
                self.engine.warm_up(self.max_batch)
            except Exception as exc:  # said by /health; requests still get answers (or errors)
                failure = exc
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        self._call(self._ready, failure)
        stopping = False
        while not (stopping and not self._jobs):
            # Block for work only when there is nothing to step; then take everything that came.
            arrived = [] if self._jobs or stopping else [self._inbox.get()]
            while True:
                try:
                    arrived.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for jobs in arrived:
                if jobs is None:
                    stopping = True
                    continue
                for job in jobs:
                    if job.cancelled:
                        self._call(self._release, 1)
                    else:
                        self._jobs.append(job)
                        self._leave(self._guard(partial(self.engine.admit, job), [job]))
            for job in [j for j in self._jobs if j.cancelled]:
                self._guard(partial(self.engine.cancel, job), [job])
                self._leave([job])
            if self._jobs:
                self._observe(len(self._jobs))
                self._leave(self._guard(self.engine.step, list(self._jobs)))

    def _guard(self, fn: Callable[[], list[Job] | None], affected: list[Job]) -> list[Job]:
        """fn's departed jobs; an exception fails every job of `affected`, and they leave."""
        try:
            return fn() or []
        except Exception as exc:
            error = as_request_error(exc)
        for job in affected:
            job.fail(error)
        return affected

    def _leave(self, left: list[Job]) -> None:
        gone = {id(j) for j in left}
        kept = [j for j in self._jobs if id(j) not in gone]
        if len(kept) < len(self._jobs):
            self._call(self._release, len(self._jobs) - len(kept))
        self._jobs = kept


class Batcher:
    """The event loop's side: `put` queues a job; `run` (a task) hands jobs on as the worker has room, up
    to `max_batch` in the worker at once, and when the worker is idle waits up to `max_wait_s` after the
    first job's arrival for others to join it. `close` hands on what is queued, then stops the worker."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.free = max_batch  # rows the worker has room for; only the loop reads or writes it
        self._pending: deque[Job] = deque()
        self._arrival = asyncio.Event()
        self._room = asyncio.Event()
        self._closing = False
        self.worker: Worker | None = None

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def put(self, job: Job) -> None:
        if self._closing:
            raise RequestError("the server is shutting down; send the request again elsewhere", status=503)
        self._pending.append(job)
        self._arrival.set()

    def release(self, rows: int) -> None:
        self.free += rows
        self._room.set()

    def close(self) -> None:
        self._closing = True
        self._arrival.set()

    async def _next(self) -> Job | None:
        """The next live job, waiting for one; None once closing with nothing left."""
        while True:
            while self._pending:
                job = self._pending.popleft()
                if not job.cancelled:
                    return job
            if self._closing:
                return None
            self._arrival.clear()
            await self._arrival.wait()

    async def run(self) -> None:
        assert self.worker is not None, "Batcher.run needs its worker"
        loop = asyncio.get_running_loop()
        while (first := await self._next()) is not None:
            while self.free <= 0:
                self._room.clear()
                await self._room.wait()
            idle = self.free == self.max_batch
            batch = [first]
            while True:
                # a gathered job may have timed out (its 504 sent) while the batch waited for others: it
                # takes no row, and the wait for batch-mates counts from the first live job's arrival
                batch = [j for j in batch if not j.cancelled]
                if len(batch) >= self.free:
                    break
                if self._pending:
                    job = self._pending.popleft()
                    if not job.cancelled:
                        batch.append(job)
                    continue
                if not batch:  # every job gathered so far timed out: start again from the next
                    break
                remaining = batch[0].arrived + self.max_wait_s - loop.time()
                if not idle or remaining <= 0 or self._closing:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [j for j in batch if not j.cancelled]
            if batch:
                self.free -= len(batch)
                self.worker.submit(batch)
        self.worker.stop()
