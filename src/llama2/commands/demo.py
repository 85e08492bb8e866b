"""`llama2 demo`: pretrain, generate, chat-format and convert a tiny model end to end on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the system end to end on a tiny model (a few minutes on a CPU)",
                              description="Builds the default corpus, tokenizer and shards (cached), pretrains a "
                                          "tiny Llama 2, generates from it, encodes a chat and converts the "
                                          "checkpoint to Meta's format and back.")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=200, help="pretraining steps (default: 200)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (the report still prints)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report.demo import run_demo
    from ..errors import Llama2Error

    if args.steps < 1:
        raise Llama2Error(f"--steps must be at least 1, got {args.steps}")
    run_demo(Path(args.out), args.steps, quiet=args.quiet)
    return 0
