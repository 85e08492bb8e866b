"""`llama2 plot RUN_DIR`: PNG curves of a training run's metrics.jsonl."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="plot a run's metrics (loss, val loss, lr, tokens/s) as PNG files",
                              description="Read RUN_DIR/metrics.jsonl and write loss.png, lr.png, "
                                          "tokens_per_s.png, ... (into RUN_DIR unless --out is given).")
    p.add_argument("run_dir", help="a training run's out_dir (or a metrics.jsonl file)")
    p.add_argument("--out", default=None, help="directory for the PNG files (default: the run directory)")
    p.add_argument("--quiet", "-q", action="store_true", help="do not list the files written")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        if not args.quiet:
            print(path)
    return 0
