"""Command-line options shared by several commands: the sampling flags of the generating commands (generate,
chat, serve) with one conversion to `SamplingParams`, and the one shape of every training stage's command
(`llama2 <stage> --config RECIPE.yaml [key=value ...]`). Not a subcommand (cli.py skips modules named `_*`)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the generation module (torch) is imported only when a command runs
    from ..inference.generate import SamplingParams


def add_sampling_args(parser: argparse.ArgumentParser, *, max_new_tokens: int = 256, temperature: float = 0.6,
                      top_p: float = 0.9, top_k: int = 0, seed_help: str | None = None) -> None:
    """Add --max-new-tokens, --temperature, --top-p, --top-k, --seed and --stop with the given defaults
    (Meta's: temperature 0.6, top-p 0.9); read them back with `sampling_params(args)`."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens to generate (default {max_new_tokens})")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 for greedy (default {temperature})")
    g.add_argument("--top-p", type=float, default=top_p,
                   help=f"nucleus sampling threshold, 1 = off (default {top_p})")
    g.add_argument("--top-k", type=int, default=top_k,
                   help=f"sample among the k likeliest tokens, 0 = off (default {top_k})")
    g.add_argument("--seed", type=int, default=None,
                   help=seed_help or "random seed; fixed, it reproduces a sample (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the output contains STR (not printed); repeatable")


def sampling_params(args: argparse.Namespace, **overrides: Any) -> SamplingParams:
    """SamplingParams from the options of add_sampling_args (plus `overrides`, e.g. truncate=True); a value out
    of range is a Llama2Error naming the flag."""
    from ..errors import Llama2Error
    from ..inference.generate import SamplingParams

    values: dict[str, Any] = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  max_new_tokens=args.max_new_tokens, stop=list(args.stop), seed=args.seed)
    values.update(overrides)
    try:
        return SamplingParams(**values)
    except Llama2Error as e:
        # SamplingParams names the field ("sampling: top_p must be ..."); on the command line it is a flag
        msg = re.sub(r"^sampling: (\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise Llama2Error(msg) from None


def add_stage_command(subparsers, name: str, *, help: str, description: str, example: str, stage: str | None = None,
                      after: Callable[[Any, bool], None] | None = None) -> argparse.ArgumentParser:
    """Register `llama2 NAME --config RECIPE.yaml [key=value ...] [--quiet]`, the shape every training stage
    shares: the recipe is loaded, what it needs is built when missing and the stage runs (llama2.pipeline), after
    stray options among the overrides were refused; `after(result, quiet)` may print a summary; the process group
    (torchrun) is shut down after. `--keys` prints every recipe key with its allowed values and default."""
    stage = stage or name
    p = subparsers.add_parser(
        name, help=help,
        description=description + " key=value arguments override recipe keys (dotted for sections; --keys lists "
                    "them). Running the same command again resumes from the latest checkpoint in out_dir. Under "
                    "`torchrun --nproc-per-node N` the model is sharded with FSDP2.")
    p.add_argument("--config", "-c", help=f"recipe YAML, e.g. {example} (required)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="recipe overrides (dotted keys)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes")
    p.add_argument("--keys", action="store_true", help="print the recipe's keys (allowed values, defaults) and exit")

    def handler(args: argparse.Namespace) -> int:
        from .. import pipeline
        from ..errors import Llama2Error
        from ..recipe import keys_table
        from ..train.distributed import shutdown

        if args.keys:
            print(keys_table(pipeline.STAGES[stage].recipe))
            return 0
        if args.config is None:
            p.error("the following arguments are required: --config/-c")
        overrides = []
        for item in args.overrides:  # options may also follow the overrides
            if item in ("-q", "--quiet"):
                args.quiet = True
            elif item.startswith("-"):
                raise Llama2Error(f"unknown option {item!r} among the overrides; options: --config, --quiet, --keys")
            else:
                overrides.append(item)
        try:
            result = pipeline.run_recipe(stage, args.config, overrides, args.quiet)
            if after is not None:
                after(result, args.quiet)
        finally:
            shutdown()
        return 0

    p.set_defaults(func=handler)
    return p
