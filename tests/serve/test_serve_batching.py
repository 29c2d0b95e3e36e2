"""The batcher and the worker with a recording engine (no model): batches up to max_batch from what waits,
rows given back as jobs leave, cancelled jobs never reaching the engine, an engine's exception failing
only its jobs (a 500 with the traceback logged) while the worker goes on."""

from __future__ import annotations

import asyncio

import pytest

from tformer.serve.batching import BatchAtATime, Batcher, Job, Worker
from tformer.serve.errors import RequestError


class Recorder(BatchAtATime):
    """Doubles each request; a request of -1 raises; remembers every batch it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def run(self, key, jobs):
        self.batches.append([j.request for j in jobs])
        if -1 in self.batches[-1]:
            raise ZeroDivisionError("a bug")
        return [2 * j.request for j in jobs]

    def warm_up(self, max_batch):
        pass


async def serve(requests, *, max_batch, cancel=()):
    """Queue every request before the batcher starts, cancel some, run until all are answered."""
    loop = asyncio.get_running_loop()
    engine = Recorder()
    batcher = Batcher(max_batch, max_wait_s=0.0)
    ready = asyncio.Event()
    batcher.worker = worker = Worker(
        engine, max_batch=max_batch, warm_up=True, loop=loop, release=batcher.release,
        ready=lambda failure: ready.set(), observe_batch=lambda n: None,
    )  # fmt: skip
    jobs = [Job("k", r, loop=loop, timeout_s=60, stream=False) for r in requests]
    for job in jobs:
        batcher.put(job)
    for i in cancel:
        jobs[i].cancelled = True
    worker.start()
    task = asyncio.create_task(batcher.run())
    await ready.wait()
    live = [j.result for i, j in enumerate(jobs) if i not in cancel]
    results = await asyncio.gather(*live, return_exceptions=True)
    batcher.close()
    await task
    await asyncio.to_thread(worker.thread.join)
    assert batcher.free == max_batch  # every row given back
    return engine.batches, results


def test_what_waits_goes_in_batches_of_max_batch():
    batches, results = asyncio.run(serve(list(range(7)), max_batch=3))
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert results == [0, 2, 4, 6, 8, 10, 12]


def test_cancelled_jobs_never_reach_the_engine():
    batches, results = asyncio.run(serve(list(range(5)), max_batch=8, cancel=(1, 3)))
    assert batches == [[0, 2, 4]] and results == [0, 4, 8]


def test_an_engine_exception_fails_its_batch_only(capsys):
    batches, results = asyncio.run(serve([1, -1, 2, 3], max_batch=2))
    assert batches == [[1, -1], [2, 3]]
    assert results[2:] == [4, 6]
    for error in results[:2]:
        assert isinstance(error, RequestError) and error.status == 500
        assert "internal error (ZeroDivisionError)" in error.message
    assert "ZeroDivisionError: a bug" in capsys.readouterr().err  # the traceback is logged


def test_a_closed_batcher_refuses_new_jobs():
    async def main():
        batcher = Batcher(2, 0.0)
        batcher.close()
        with pytest.raises(RequestError, match="shutting down") as info:
            batcher.put(Job("k", 1, loop=asyncio.get_running_loop(), timeout_s=1, stream=False))
        assert info.value.status == 503

    asyncio.run(main())


def test_a_job_that_timed_out_while_gathered_takes_no_row():
    """A lone job waits for batch-mates and times out (cancelled) meanwhile; two later jobs, the second
    arriving after the first, form one batch: the dead job neither takes a row nor ends the first live
    one's wait for a mate."""

    async def main():
        loop = asyncio.get_running_loop()
        engine = Recorder()
        batcher = Batcher(2, max_wait_s=30.0)
        ready = asyncio.Event()
        batcher.worker = worker = Worker(
            engine, max_batch=2, warm_up=True, loop=loop, release=batcher.release,
            ready=lambda failure: ready.set(), observe_batch=lambda n: None,
        )  # fmt: skip
        worker.start()
        task = asyncio.create_task(batcher.run())
        await ready.wait()
        lone = Job("k", 1, loop=loop, timeout_s=60, stream=False)
        batcher.put(lone)
        await asyncio.sleep(0.05)  # the batcher holds it, waiting for a mate
        lone.cancelled = True  # (the app's timeout)
        a, b = (Job("k", r, loop=loop, timeout_s=60, stream=False) for r in (2, 3))
        batcher.put(a)
        await asyncio.sleep(0.05)  # a arrives alone: it must wait for b, not go as a batch of one
        assert engine.batches == []
        batcher.put(b)
        results = await asyncio.wait_for(asyncio.gather(a.result, b.result), 10)
        batcher.close()
        await task
        await asyncio.to_thread(worker.thread.join)
        assert batcher.free == 2
        return engine.batches, results

    batches, results = asyncio.run(main())
    assert batches == [[2, 3]] and results == [4, 6]
