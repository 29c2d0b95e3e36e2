"""`tformer merge ADAPTER_CKPT --out DIR`: a LoRA run's adapters merged into their base as a self-contained
checkpoint (training/lora.py's merge_checkpoint). The command line's part only; torch is imported on use."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register `merge` on the command line's subparsers (cli.build_parser)."""
    parser = sub.add_parser(
        "merge",
        help="merge a LoRA run's adapters into their base: a self-contained checkpoint (no peft needed)",
        usage="tformer merge ADAPTER_CKPT --out DIR [--overwrite]",
    )
    parser.add_argument(
        "checkpoint",
        metavar="ADAPTER_CKPT",
        help="a LoRA run's checkpoint (or its run directory: best, else latest)",
    )
    parser.add_argument("--out", required=True, help="the checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at --out")
    parser.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    from tformer.training.lora import merge_checkpoint

    path = merge_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"merged the adapters of {args.checkpoint} into their base\ncheckpoint: {path}")
    return 0
