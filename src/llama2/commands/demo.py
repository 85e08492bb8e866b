"""`llama2 demo`: every stage the project has, end to end on a tiny model on a CPU, within a time budget, with a
report (report.md + report.html, and the measured numbers in results.json) in the output directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import Llama2Error
from ..report import DEFAULT_BUDGET_MINUTES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help=f"run the system end to end on a tiny model (about {DEFAULT_BUDGET_MINUTES:g} minutes on a CPU)",
        description="Builds the corpus, tokenizer and shards and the dialogues and comparisons (cached) of the "
                    "built-in world (or of the standard library: --world stdlib), "
                    "pretrains a tiny Llama 2, generates from it, encodes a chat, fine-tunes it on dialogues (SFT), "
                    "trains the two reward models, runs rejection sampling, PPO, Ghost Attention and safety "
                    "distillation, evaluates every stage's model and converts the checkpoint to Meta's format and "
                    "back; the builds come out of the budget first, and each stage's length scales to its share of "
                    "the rest. Writes DIR/report.md, DIR/report.html and DIR/results.json.")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo); the demo's own "
                                                      "subdirectories in it are replaced")
    p.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                   help=f"wall-clock budget shared by all stages (default: {DEFAULT_BUDGET_MINUTES:g})")
    p.add_argument("--steps", type=int, default=None,
                   help="fixed pretraining steps instead of the budget's share (for reproducible runs)")
    p.add_argument("--world", choices=["world", "stdlib"], default="world",
                   help="world (default): the built-in world of invented people and towns, where every stage is "
                        "measured against a gold judge; stdlib: the Python standard library's text and dialogues "
                        "(reward-model figures only)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every stage (default 0); two seeds show the "
                                                       "spread of each effect")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (the summary lines still print)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report.demo import run_demo  # here, not at the top: it imports torch and every stage (`llama2 --help`)

    if not args.budget_minutes > 0:
        raise Llama2Error(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.steps is not None and args.steps < 1:
        raise Llama2Error(f"--steps must be at least 1, got {args.steps}")
    run_demo(Path(args.out), args.budget_minutes, quiet=args.quiet, steps=args.steps, world=args.world,
             seed=args.seed)
    return 0
