"""`llama2 pretrain --config RECIPE.yaml [key=value ...]`: pretrain (or resume) a model from token shards."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a model on token shards (resumes from the run's latest checkpoint)",
        description="Pretrain a Llama 2 model as a YAML recipe says; key=value arguments override recipe keys "
                    "(e.g. optim.lr=1e-3 model.dim=128 max_steps=50 out_dir=runs/x). Running the same command "
                    "again resumes from the latest checkpoint in out_dir. Under `torchrun --nproc-per-node N` "
                    "the model is sharded with FSDP2.")
    p.add_argument("--config", "-c", required=True, help="recipe YAML, e.g. configs/tiny/pretrain.yaml")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="recipe overrides (dotted keys)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import Llama2Error
    from ..train.config import PretrainRecipe, load_recipe
    from ..train.distributed import shutdown
    from ..stages.pretrain import pretrain

    overrides = []
    for item in args.overrides:  # options may also follow the overrides
        if item in ("-q", "--quiet"):
            args.quiet = True
        elif item.startswith("-"):
            raise Llama2Error(f"unknown option {item!r} among the overrides; options: --config, --quiet")
        else:
            overrides.append(item)
    recipe = load_recipe(PretrainRecipe, args.config, overrides)
    try:
        result = pretrain(recipe, quiet=args.quiet)
    finally:
        shutdown()
    if not args.quiet and result.checkpoint is not None:
        last = result.last
        val = f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        print(f"step {result.step}: loss {last.get('loss', float('nan')):.4f}{val}; checkpoint {result.checkpoint}")
    return 0
