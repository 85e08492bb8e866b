"""`llama2 pretrain --config RECIPE.yaml [key=value ...]`: pretrain (or resume) a model from token shards."""

from __future__ import annotations

from typing import Any

from ._options import add_stage_command


def register(subparsers) -> None:
    add_stage_command(subparsers, "pretrain", after=summary, example="configs/tiny/pretrain.yaml",
                      help="pretrain a model on token shards (resumes from the run's latest checkpoint)",
                      description="Pretrain a Llama 2 model as a YAML recipe says (e.g. optim.lr=1e-3 model.dim=128 "
                                  "max_steps=50 out_dir=runs/x).")


def summary(result: Any, quiet: bool) -> None:
    """The last step's losses and the checkpoint."""
    if not quiet and result.checkpoint is not None:
        last = result.last
        val = f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        print(f"step {result.step}: loss {last.get('loss', float('nan')):.4f}{val}; checkpoint {result.checkpoint}")
