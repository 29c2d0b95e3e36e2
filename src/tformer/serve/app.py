"""The ASGI app (Starlette): the family's endpoints, /health, /metrics, and the checks every request
passes before it is queued (API key, body size, JSON, the endpoint's schema). The batcher and the worker
start with the app's lifespan and drain when it ends (uvicorn's graceful shutdown on SIGTERM first
waits for the requests in flight, then the lifespan hands on what is queued and lets the worker finish).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tformer.serve.batching import Batcher, Job, Worker, internal_error
from tformer.serve.errors import RequestError, error_body, error_response
from tformer.serve.metrics import CONTENT_TYPE, Metrics
from tformer.serve.options import ServeOptions
from tformer.serve.schema import Body, parse_json
from tformer.serve.service import Answer, Endpoint, Service, Stream

# Every family's endpoints: a server answers the others with a 404 that says which family it holds.
ENDPOINTS = {
    "/v1/translate": "translation",
    "/v1/classify": "classification and vision",
    "/v1/generate": "lm",
    "/v1/completions": "lm",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: object) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def service_for(predictor: object, name: str, options: ServeOptions, metrics: Metrics) -> Service:
    """The family's service of a loaded predictor (tformer.tasks.open_predictor's)."""
    from tformer.serve import classification, lm, translation
    from tformer.tasks import TextClassifier, TextGenerator, Translator
    from tformer.tasks.vision import ImageClassifier

    if isinstance(predictor, (Translator, TextGenerator)):
        architecture = predictor.model.config.architecture
        if architecture != "transformer":  # continuous batching rides the Transformer's per-row KV cache
            raise ValueError(
                f"tformer serve decodes {type(predictor).__name__} checkpoints with continuous batching, which "
                f"the {architecture} baseline has no per-row cache for; serve a Transformer checkpoint"
            )
    if isinstance(predictor, Translator):
        return translation.service(predictor, name, max_batch=options.max_batch, generated=metrics.generated)
    if isinstance(predictor, TextClassifier):
        return classification.text_service(predictor, name)
    if isinstance(predictor, ImageClassifier):
        return classification.image_service(predictor, name)
    if isinstance(predictor, TextGenerator):
        return lm.service(
            predictor, name, max_batch=options.max_batch, compile=options.compile, generated=metrics.generated
        )
    raise TypeError(f"tformer serve has no endpoints for a {type(predictor).__name__}")


class Server:
    """One app's state: the service, its options and metrics; the batcher and worker once started."""

    def __init__(self, predictor: object, options: ServeOptions, name: str) -> None:
        self.options = options
        self.metrics = Metrics()
        self.service = service = service_for(predictor, name, options, self.metrics)
        self.metrics.info(service.family, name)
        self.batcher: Batcher | None = None
        self.worker: Worker | None = None
        self.ready = False
        self.failure: BaseException | None = None

    def on_ready(self, failure: BaseException | None) -> None:
        self.ready, self.failure = True, failure
        self.metrics.ready.set(0 if failure else 1)

    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError(
                "missing or wrong API key; expected the header 'Authorization: Bearer <key>' (tformer serve --api-key)",
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_body(self, request: Request) -> bytes:
        limit = self.options.max_body_bytes
        too_big = RequestError(
            f"the body is over the server's limit of {limit} bytes (--max-body-bytes)", status=413
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
        except ClientDisconnect:
            raise RequestError("the client went away while sending the body") from None
        return b"".join(chunks)

    async def submit(self, endpoint: Endpoint, request: Request) -> Job:
        """A request checked and queued: auth, size, JSON, the endpoint's schema and the model's limits."""
        self.authorize(request)
        body = Body(parse_json(await self.read_body(request)), endpoint.accepted)
        try:
            parsed = (
                await run_in_threadpool(endpoint.parse, body) if endpoint.offload else endpoint.parse(body)
            )
        except (ValueError, TypeError) as exc:  # the library's own checks of a value the schema let through
            raise RequestError(f"the request cannot be decoded: {exc}") from None
        if parsed.stream and endpoint.stream is None:
            raise RequestError("stream: this endpoint does not stream; expected false", field="stream")
        if self.batcher is None:
            raise RequestError("the server is not started (its lifespan has not run)", status=503)
        loop = asyncio.get_running_loop()
        job = Job(
            parsed.key, parsed.request, loop=loop, timeout_s=self.options.timeout_s, stream=parsed.stream
        )
        self.batcher.put(job)
        return job

    def timed_out(self, job: Job) -> RequestError:
        job.cancelled = True
        return RequestError(
            f"the request took longer than the server's timeout of {self.options.timeout_s:g} s (--timeout)",
            status=504,
        )

    async def result(self, job: Job) -> Any:
        remaining = job.deadline - job.loop.time()
        try:
            done, _ = await asyncio.wait({job.result}, timeout=max(0.0, remaining))
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if not done:
            raise self.timed_out(job)
        return job.result.result()

    async def news(self, job: Job) -> None:
        """Until the job has streamed text or its result (a 504 past its deadline)."""
        while not job.deltas and not job.result.done():
            job.news.clear()
            try:
                await asyncio.wait_for(job.news.wait(), max(0.0, job.deadline - job.loop.time()))
            except asyncio.TimeoutError:
                raise self.timed_out(job) from None

    async def streamed(self, path: str, job: Job, stream: Stream, answer: Answer) -> StreamingResponse:
        """Server-sent events. The first text (or the result, or an error) is awaited before the response
        starts, so a request that fails or times out before any text gets its status code."""
        await self.news(job)
        failure = job.result.exception() if job.result.done() else None
        if failure is not None:
            raise failure

        async def events() -> AsyncIterator[bytes]:
            try:
                while True:
                    while job.deltas:
                        yield sse(stream.delta(job.deltas.popleft(), answer))
                    if job.result.done():
                        break
                    await self.news(job)
                yield sse(stream.last(job.result.result(), answer))
                yield b"data: [DONE]\n\n"
            except RequestError as exc:  # after the status went out: an error event, and no [DONE]
                yield sse(error_body(exc.message, exc.field))
            finally:  # the client gone (the task cancelled), or done: its row is freed either way
                job.cancelled = not job.result.done()
                self.metrics.answered(path, 200, job.loop.time() - job.arrived)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    def handler(self, path: str, endpoint: Endpoint) -> Any:
        async def handle(request: Request) -> Response:
            loop = asyncio.get_running_loop()
            started = loop.time()
            answer = Answer(uuid.uuid4().hex, int(time.time()))
            try:
                job = await self.submit(endpoint, request)
                if job.stream:
                    assert endpoint.stream is not None
                    return await self.streamed(path, job, endpoint.stream, answer)
                response: Response = JSONResponse(endpoint.reply(await self.result(job), answer))
            except RequestError as exc:
                response = error_response(exc)
            except Exception as exc:
                response = error_response(internal_error(exc))
            self.metrics.answered(path, response.status_code, loop.time() - started)
            return response

        return handle

    def elsewhere(self, path: str) -> Any:
        """An endpoint of another family: a 404 naming the family held and its endpoints."""
        own = ", ".join(f"POST {p}" for p in self.service.endpoints)

        async def handle(request: Request) -> Response:
            try:
                self.authorize(request)
            except RequestError as exc:
                return error_response(exc)
            message = (
                f"{path} is the {ENDPOINTS[path]} family's endpoint; this server holds a {self.service.family} "
                f"model ({self.service.name}): {own}"
            )
            self.metrics.answered(path, 404, 0.0)
            return error_response(RequestError(message, status=404))

        return handle

    async def health(self, request: Request) -> Response:
        info = {"family": self.service.family, "model": self.service.name}
        if not self.ready:
            body = error_body("warming up: tuning and compiling for the batch sizes it serves")
            return JSONResponse({"status": "warming up", **info, **body}, status_code=503)
        if self.failure is not None:
            body = error_body(f"the warm-up failed: {type(self.failure).__name__}: {self.failure}")
            return JSONResponse({"status": "failed", **info, **body}, status_code=503)
        return JSONResponse({"status": "ready", **info, "max_batch": self.options.max_batch})

    async def metrics_page(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except RequestError as exc:
            return error_response(exc)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        o = self.options
        self.batcher = batcher = Batcher(o.max_batch, o.max_wait_ms / 1000)
        self.worker = worker = Worker(
            self.service.engine,
            max_batch=o.max_batch,
            warm_up=o.warm_up,
            loop=loop,
            release=batcher.release,
            ready=self.on_ready,
            observe_batch=self.metrics.batch.observe,
        )
        batcher.worker = worker
        self.metrics.waiting.set_function(lambda: batcher.waiting)
        self.metrics.active.set_function(lambda: o.max_batch - batcher.free)
        worker.start()
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            batcher.close()
            await task  # what was queued goes to the worker, then its stop
            await asyncio.to_thread(worker.thread.join)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 in the server's error shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no endpoint {request.url.path}; this server has GET /health, GET /metrics and its family's POST endpoints"
    elif exc.status_code == 405:
        message = f"{request.method} {request.url.path} is not allowed; expected {exc.headers.get('Allow', 'POST') if exc.headers else 'POST'}"
    else:
        message = str(exc.detail)
    return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)


def create_app(predictor: object, options: ServeOptions, *, name: str) -> Starlette:
    """The app serving a loaded predictor (its family's endpoints; `name`: what responses call the model).
    Its batcher and worker start, and warm up, with the app's lifespan (`with TestClient(app)`, uvicorn)."""
    server = Server(predictor, options, name)
    service = server.service
    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
    ]
    for path, endpoint in service.endpoints.items():
        routes.append(Route(path, server.handler(path, endpoint), methods=["POST"]))
    for path in ENDPOINTS:
        if path not in service.endpoints:
            routes.append(
                Route(path, server.elsewhere(path), methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
            )
    app = Starlette(routes=routes, lifespan=server.lifespan, exception_handlers={HTTPException: _http_error})
    app.state.server = server
    return app
