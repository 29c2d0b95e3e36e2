"""Benchmarks people run from the CLI (`tformer bench ...`): timings, peak memory, JSON + markdown + PNG."""

from __future__ import annotations

import argparse


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """The options of `tformer bench train` and `tformer bench generate` (no torch import: --help is fast)."""
    parser.add_argument(
        "--shapes",
        default=None,
        help="train: comma-separated shapes (baby, gpt2-small; default both on the CPU, gpt2-small at "
        "batch 12 x 1024 tokens on a GPU)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="train, generate: cpu (default) or cuda[:N]: models, batches and the ceilings on that device",
    )
    parser.add_argument(
        "--precisions",
        default=None,
        help="train: fp32,bf16 (default both); generate: fp32,bf16,int8 (default all three)",
    )
    parser.add_argument("--no-compile", action="store_true", help="train: no torch.compile row")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="train: steps per timed repeat (default 10 baby, 1 gpt2-small)",
    )
    parser.add_argument("--loss-steps", type=int, default=None, help="train: loss-curve steps (20 / 4)")
    parser.add_argument("--batches", default="1,8", help="generate: comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=32, help="generate: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="generate: tokens generated per row")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="train, generate: torch threads (default: torch's; 1 is steadier on a machine shared with "
        "other jobs, whose barriers stall multi-threaded kernels)",
    )
