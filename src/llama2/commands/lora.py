"""`llama2 lora merge BASE ADAPTER OUT`: fold a LoRA adapter into its base and write a plain checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("lora", help="LoRA adapters: merge one into its base model",
                              description="LoRA adapters (PEFT layout, as `llama2 sft lora.rank=N` writes them).")
    sub = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    m = sub.add_parser("merge", help="write BASE + ADAPTER as one plain checkpoint",
                       description="Load the base checkpoint (HF or Meta layout), apply the adapter, fold W + "
                                   "(alpha/r) B A into every adapted weight (as PEFT's merge_and_unload) and write "
                                   "OUT in the Hugging Face layout with the tokenizer. An adapter that does not fit "
                                   "the base is an error.")
    m.add_argument("base", type=Path, help="the base checkpoint the adapter was trained on")
    m.add_argument("adapter", type=Path, help="the adapter directory (adapter_config.json + "
                                              "adapter_model.safetensors), e.g. RUN/checkpoints/step-000100")
    m.add_argument("out", type=Path, help="output checkpoint directory")
    m.add_argument("--dtype", default=None, help="dtype of the written weights (default: the base's)")
    m.set_defaults(func=merge_handler)


def merge_handler(args: argparse.Namespace) -> int:
    from ..checkpoint import save_model
    from ..errors import Llama2Error
    from ..checkpoint.runs import load_tokenizer

    merged = merge_adapter(args.base, args.adapter)
    tokenizer = None
    for d in (args.adapter, args.base):
        try:
            tokenizer = load_tokenizer(Path(d))
            break
        except Llama2Error:  # the next place may hold it
            continue
    save_model(merged, args.out, tokenizer, dtype=args.dtype)
    print(f"merged {args.adapter} into {args.base} -> {args.out}")
    return 0


def merge_adapter(base: Path, adapter: Path):
    """The base with the adapter folded in (a plain Transformer): load_checkpoint(adapter, base=base), merge."""
    from ..checkpoint import detect_kind, load_checkpoint
    from ..errors import Llama2Error
    from ..lora import merge_lora

    if detect_kind(adapter) != "adapter":
        raise Llama2Error(f"{adapter} is not a LoRA adapter directory (no adapter_config.json); give the adapter "
                          "a LoRA run saved, e.g. RUN/checkpoints/step-NNNNNN")
    return merge_lora(load_checkpoint(adapter, base=base))
