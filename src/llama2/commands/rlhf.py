"""`llama2 rlhf rejection-sampling --config RECIPE.yaml [key=value ...]`: RLHF stages (paper section 6)."""

from __future__ import annotations

from ._options import add_stage_command


def register(subparsers) -> None:
    p = subparsers.add_parser("rlhf", help="RLHF: iterative rejection-sampling fine-tuning",
                              description="RLHF stages of Llama 2-Chat (paper section 6).")
    sub = p.add_subparsers(dest="rlhf_command", required=True, metavar="STAGE")
    add_stage_command(sub, "rejection-sampling", run=run_rejection, example="configs/tiny/rejection.yaml",
                      help="iterative rejection-sampling fine-tuning with the two reward models (resumes)",
                      description="For each prompt draw K answers from the policy, score them with the combined "
                                  "reward of the helpfulness and safety RMs, keep the best, fine-tune on them through "
                                  "the SFT stage; iterations V1..Vn in one run directory (e.g. iterations=3 "
                                  "samples_per_prompt=8 temperature=sweep pool=all).")


def run_rejection(recipe: tuple[str, list[str]], quiet: bool) -> None:
    from ..stages.rejection import RejectionRecipe, rejection_sampling
    from ..train.config import load_recipe

    rejection_sampling(load_recipe(RejectionRecipe, *recipe), quiet=quiet)
