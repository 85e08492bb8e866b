"""`llama2 sft --config RECIPE.yaml [key=value ...]`: supervised fine-tuning of a base model on dialogues."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning on dialogues (resumes from the run's latest checkpoint)",
        description="Fine-tune a base checkpoint on dialogues as a YAML recipe says (paper section 3.1): packed "
                    "dialogues, loss on the answers only, optional LoRA. key=value arguments override recipe keys "
                    "(e.g. base=ckpt/ data.path=d.jsonl lora.rank=8 max_steps=50 out_dir=runs/x). Running the same "
                    "command again resumes from the latest checkpoint in out_dir. Under `torchrun "
                    "--nproc-per-node N` the model is sharded with FSDP2.")
    p.add_argument("--config", "-c", required=True, help="recipe YAML, e.g. configs/tiny/sft.yaml")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="recipe overrides (dotted keys)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import Llama2Error
    from ..stages.sft import SFTRecipe, sft
    from ..train.config import load_recipe
    from ..train.distributed import shutdown

    overrides = []
    for item in args.overrides:  # options may also follow the overrides
        if item in ("-q", "--quiet"):
            args.quiet = True
        elif item.startswith("-"):
            raise Llama2Error(f"unknown option {item!r} among the overrides; options: --config, --quiet")
        else:
            overrides.append(item)
    recipe = load_recipe(SFTRecipe, args.config, overrides)
    try:
        sft(recipe, quiet=args.quiet)
    finally:
        shutdown()
    return 0
