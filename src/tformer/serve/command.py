"""`tformer serve`'s arguments (`add_serve_parser`, registered by cli.py); imports neither starlette nor
torch until the command runs, so `tformer --help` stays fast."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from tformer.families.commands import compile_option, precision_option
from tformer.serve.options import ServeOptions

if TYPE_CHECKING:
    from tformer.families.commands import Subparsers

DEFAULTS = ServeOptions()
LIMITS = [  # flag, type, default, what it is
    ("--max-batch", int, DEFAULTS.max_batch, "requests decoded together"),
    (
        "--max-wait-ms",
        float,
        DEFAULTS.max_wait_ms,
        "how long an idle server waits for more requests to join the first",
    ),
    ("--timeout", float, DEFAULTS.timeout_s, "seconds a request may take before a 504"),
    ("--max-body-bytes", int, DEFAULTS.max_body_bytes, "larger request bodies get a 413"),
]


def _serve(args: argparse.Namespace) -> int:
    from tformer.serve.server import serve

    options = ServeOptions(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        timeout_s=args.timeout,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("TFORMER_API_KEY") or None,
        compile=args.compile,
        warm_up=not args.no_warm_up,
    )
    return serve(args.checkpoint, options, host=args.host, port=args.port, precision=args.precision)


def add_serve_parser(sub: Subparsers) -> None:
    sv = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP (its family's endpoints, dynamic batching, streaming, /metrics)",
    )
    sv.add_argument("checkpoint", help="checkpoint directory or run directory")
    sv.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $TFORMER_API_KEY if set, which keeps the key out of the process list; else none)",
    )
    for flag, kind, default, what in LIMITS:
        sv.add_argument(flag, type=kind, default=default, help=f"{what} (default: %(default)s)")
    sv.add_argument(
        "--no-warm-up", action="store_true", help="ready at once, without decoding each batch size first"
    )
    precision_option(sv)
    compile_option(sv)
    sv.set_defaults(func=_serve)
