"""`llama2 reward --config RECIPE.yaml [key=value ...]`: train a helpfulness or safety reward model."""

from __future__ import annotations

from ._options import add_stage_command


def register(subparsers) -> None:
    add_stage_command(subparsers, "reward", example="configs/tiny/reward-helpfulness.yaml",
                      help="train a helpfulness or safety reward model on comparisons (resumes)",
                      description="Train a reward model from a chat checkpoint on preference comparisons as a YAML "
                                  "recipe says (paper section 5): scalar head on the chat model, binary ranking "
                                  "loss with the rating margin (margin=none|small|large), weighted data mixes, "
                                  "held-out accuracy per rating level in eval.md (e.g. kind=safety "
                                  "data.path=c.jsonl data.val_path=c.val.jsonl max_steps=50 out_dir=runs/x).")

