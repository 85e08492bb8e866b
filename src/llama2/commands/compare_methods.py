"""`llama2 compare-methods`: rejection sampling, PPO, DPO and GRPO (on the RMs and on the gold judge) from one SFT
model with the same time each, measured against the built-in world's gold judge, as a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import Llama2Error


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare-methods", help="compare RLHF methods from one SFT model on the built-in world's gold judge",
        description="From one SFT model and its two reward models (a demo's, --from, or given one by one; "
                    "default: the world recipes' runs, built when missing), train rejection sampling, PPO, DPO, "
                    "GRPO on the RMs and GRPO on the gold judge for the same time each, then measure every model "
                    "on the same held-out world questions: gold accuracy and its paired change from SFT, the "
                    "RMs' reward, the KL to SFT, safety violations and false refusals, answers sampled, seconds. "
                    "Writes DIR/report.md, DIR/report.html and DIR/results.json.")
    p.add_argument("--out", default="runs/methods", help="output directory (default: runs/methods)")
    p.add_argument("--from", dest="source", default=None,
                   help="a demo's output directory: its sft/, rm-helpfulness/ and rm-safety/ runs")
    p.add_argument("--sft", default=None, help="the SFT model (checkpoint or run)")
    p.add_argument("--helpfulness-rm", default=None, help="the helpfulness RM (checkpoint or run)")
    p.add_argument("--safety-rm", default=None, help="the safety RM (checkpoint or run)")
    p.add_argument("--budget-minutes", type=float, default=15.0, help="shared equally by the methods (default 15)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of rejection,ppo,dpo,grpo-rm,grpo-gold (default: all)")
    p.add_argument("--seed", type=int, default=0, help="every method's seed (default 0); the first with --seeds")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per method, with seeds --seed, --seed + 1, ...: the table gives the means and the "
                        "change's 95%% interval over the seeds (default 1: the interval is over the questions)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def inputs(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The SFT model and the two RMs the comparison starts from (built by the world recipes when defaulted)."""
    from ..checkpoint.runs import require_checkpoint

    given = [args.sft, args.helpfulness_rm, args.safety_rm]
    if args.source is not None:
        if any(given):
            raise Llama2Error("give either --from (a demo's output) or --sft/--helpfulness-rm/--safety-rm, not both")
        root = Path(args.source)
        given = [str(root / "sft"), str(root / "rm-helpfulness"), str(root / "rm-safety")]
    elif not all(given):
        if any(given):
            raise Llama2Error("give all three of --sft, --helpfulness-rm and --safety-rm (or none: the world "
                              "recipes' runs)")
        from .. import pipeline

        for recipe in ("configs/world/reward-helpfulness.yaml", "configs/world/reward-safety.yaml"):
            pipeline.run_recipe("reward", recipe)  # builds the SFT model first when missing; a finished run returns
        given = ["runs/world-sft", "runs/world-rm-helpfulness", "runs/world-rm-safety"]
    names = ("SFT model", "helpfulness RM", "safety RM")
    return tuple(require_checkpoint(p, what) for p, what in zip(given, names))  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from ..report.demo import run_methods
    from ..report.sections.methods import METHODS

    if not args.budget_minutes > 0:
        raise Llama2Error(f"--budget-minutes must be positive, got {args.budget_minutes}")
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise Llama2Error(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    if args.seeds < 1:
        raise Llama2Error(f"--seeds must be at least 1, got {args.seeds}")
    sft, h, s = inputs(args)
    run_methods(Path(args.out), sft, h, s, args.budget_minutes, quiet=args.quiet, seed=args.seed, methods=methods,
                seeds=args.seeds)
    return 0
