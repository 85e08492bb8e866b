"""`llama2 gatt --config RECIPE.yaml [key=value ...]`: Ghost Attention fine-tuning (paper section 7)."""

from __future__ import annotations

from ._options import add_stage_command


def register(subparsers) -> None:
    add_stage_command(subparsers, "gatt", example="configs/tiny/gatt.yaml",
                      help="Ghost Attention: make a system instruction hold over many turns (resumes)",
                      description="Append an instruction to every user turn, sample the replies with the model, keep "
                                  "the instruction once (system message or first user turn) and fine-tune on the last "
                                  "answer only (e.g. families=[upper_case,end_with] placement=system turns=3).")

