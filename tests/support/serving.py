"""For the server's tests (tests/serve): tiny checkpoints of every family trained here, a client on an app
(lifespan run, so the batcher and the worker are up), and server-sent events read back."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from starlette.testclient import TestClient

from support.images import image_folder
from support.models import TEXT, build
from tformer import cli
from tformer.serve import ServeOptions
from tformer.serve.app import create_app
from tformer.training import Trainer

BATCHING = {"translation": {"batch_tokens": 120}, "classification": {"batch_tokens": 24}}
LM = ["data.tokenizer=char", "model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_layers=2"]
LM += [
    "model.max_seq_len=64",
    "model.dropout=0.0",
    "train.batch_size=4",
    "train.lr=0.003",
    "train.warmup_steps=2",
]
VISION = ["model.image_size=8", "model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_layers=2"]


def trained(family: str, root: Path, *, steps: int = 30) -> Path:
    """A checkpoint of `family` after `steps` training steps (support.models.build's task; vision: a tiny
    ViT on generated image folders; lm: a character model with room for 64 tokens on TEXT)."""
    if family == "lm":
        (root / "text.txt").write_text(TEXT)
        argv = ["train", "lm", "--train", str(root / "text.txt"), "--valid", str(root / "text.txt")]
        argv += ["--out", str(root / "run"), "--no-progress", *LM, f"train.max_steps={steps}"]
        assert cli.main(argv) == 0
    elif family == "vision":
        image_folder(root / "train", {"cat": 6, "dog": 6, "eel": 6}, size=8)
        image_folder(root / "valid", {"cat": 2, "dog": 2, "eel": 2}, size=8, seed=1)
        argv = ["train", "vision", "--train", str(root / "train"), "--valid", str(root / "valid")]
        argv += ["--out", str(root / "run"), "--no-progress", *VISION, f"train.max_steps={steps}"]
        argv += ["train.batch_size=6", "train.lr=0.003", "train.warmup_steps=2", "train.epochs=100"]
        assert cli.main(argv) == 0
    else:
        task, model = build(family, max_steps=steps, **BATCHING[family])
        Trainer(model, task, task.train_config, out_dir=root / "run", progress=False).fit()
    return root / "run" / "checkpoint"


@contextmanager
def serving(predictor: object, **options: object) -> Iterator[TestClient]:
    """A TestClient on an app of `predictor` (ServeOptions from `options`), its lifespan running."""
    app = create_app(predictor, ServeOptions(**options), name="tiny")  # type: ignore[arg-type]
    with TestClient(app) as client:
        yield client


def posted_together(predictor: object, path: str, bodies: list[dict], **options: object):
    """POST every body at once to a fresh app, from one event loop in this thread (httpx's ASGI transport,
    the app's lifespan around it): the requests reach the batcher in the order given, every run, so the
    rows of a batch are the same each time. -> (the responses, the app's Server)."""
    app = create_app(predictor, ServeOptions(**options), name="tiny")  # type: ignore[arg-type]

    async def main() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tiny", timeout=60) as client:
                return list(await asyncio.gather(*(client.post(path, json=b) for b in bodies)))

    return asyncio.run(main()), app.state.server


def server_of(client: TestClient):
    return client.app.state.server  # type: ignore[attr-defined]


def batches(server) -> tuple[float, float]:
    """How many batches (or continuous-batching steps) the worker ran, and the requests they held."""
    samples = {s.name: s.value for s in server.metrics.batch.collect()[0].samples}
    return samples["tformer_batch_size_count"], samples["tformer_batch_size_sum"]


def largest_batch(server) -> float:
    """The bucket bound of the most requests one batch (or step) held: 8 for 5..8 (buckets 1, 2, 4, 8, ...)."""
    samples = server.metrics.batch.collect()[0].samples
    total = next(s.value for s in samples if s.name == "tformer_batch_size_count")
    return min(
        float(s.labels["le"]) for s in samples if s.name == "tformer_batch_size_bucket" and s.value == total
    )


class Gate:
    """Holds the worker before each step of `engine` until the test lets it go: steps become countable."""

    def __init__(self, engine) -> None:
        self.permits = threading.Semaphore(0)
        self.taken = 0  # steps done
        step = engine.step

        def gated():
            self.permits.acquire(timeout=30)
            left = step()
            self.taken += 1
            return left

        engine.step = gated

    def let(self, n: int = 1) -> None:
        for _ in range(n):
            self.permits.release()


def until(condition, what: str, limit: float = 30.0) -> None:
    """Wait for `condition()` (a server-side state the test cannot await); fail with `what` past `limit`.
    No timing is asserted: the limit only keeps a broken server from hanging the suite."""
    end = time.monotonic() + limit
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"still not {what} after {limit} s")
        time.sleep(0.01)


def events(lines: Iterable[str]) -> list[object]:
    """Server-sent events' data fields: JSON values, and the string "[DONE]"."""
    out: list[object] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected line in the event stream: {line!r}"
    return out
