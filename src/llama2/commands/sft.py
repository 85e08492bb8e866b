"""`llama2 sft --config RECIPE.yaml [key=value ...]`: supervised fine-tuning of a base model on dialogues."""

from __future__ import annotations

from ._options import add_stage_command


def register(subparsers) -> None:
    add_stage_command(subparsers, "sft", example="configs/tiny/sft.yaml",
                      help="supervised fine-tuning on dialogues (resumes from the run's latest checkpoint)",
                      description="Fine-tune a base checkpoint on dialogues as a YAML recipe says (paper section "
                                  "3.1): packed dialogues, loss on the answers only, optional LoRA (e.g. base=ckpt/ "
                                  "data.path=d.jsonl lora.rank=8 max_steps=50 out_dir=runs/x).")

