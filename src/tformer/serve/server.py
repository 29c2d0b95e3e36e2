"""`tformer serve CHECKPOINT`: load the checkpoint as its family's predictor (precision, tformer.accel),
build the app and run it under uvicorn until SIGINT / SIGTERM, which drain the requests in flight."""

from __future__ import annotations

import sys
from pathlib import Path

from tformer.serve.options import ServeOptions

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def model_name(path: Path) -> str:
    """What responses call the model: a run's `checkpoint-N` with its run directory's name."""
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint") else path.name


def serve(checkpoint: str | Path, options: ServeOptions, *, host: str, port: int, precision: str) -> int:
    import uvicorn

    from tformer.serve.app import create_app
    from tformer.tasks import open_predictor
    from tformer.training import run_dir

    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 0 to 65535")
    path = run_dir.resolve(checkpoint, say=True)
    predictor = open_predictor(path, precision=precision, accel=True)
    app = create_app(predictor, options, name=model_name(path))
    if host not in LOOPBACK and options.api_key is None:
        print(
            f"warning: serving on {host} without --api-key: anyone who can reach the port can use the model",
            file=sys.stderr,
        )
    # On SIGTERM uvicorn stops accepting, waits for the requests in flight (each within its timeout), then
    # ends the lifespan, which lets the worker finish what was queued.
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=int(options.timeout_s) + 5)
    return 0
