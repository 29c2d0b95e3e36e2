"""`tformer serve`: a checkpoint over HTTP, an ASGI app (Starlette) under uvicorn, the `serve` extra.

    app.py             the app: the family's endpoints, /health, /metrics, auth, body limit, streaming
    batching.py        Job, Batcher (event loop) and Worker (the one inference thread), BatchAtATime
    schema.py          request bodies: strict JSON and typed fields, errors naming the field
    translation.py, classification.py, lm.py   each family's endpoints and engine
    metrics.py         Prometheus metrics; options.py: ServeOptions; server.py: load + uvicorn

The library's API is `create_app(predictor, ServeOptions(...), name=...)` (tformer.serve.app) and
`serve(checkpoint, options, host=, port=, precision=)` (tformer.serve.server); `import tformer.serve`
itself imports neither starlette nor torch.
"""

from tformer.serve.options import ServeOptions

__all__ = ["ServeOptions"]
