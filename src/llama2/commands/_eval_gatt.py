"""`llama2 eval gatt CKPT`: Ghost Attention's adherence by turn (one `llama2 eval` subcommand)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub) -> None:
    g = sub.add_parser("gatt", help="how long a system instruction holds: adherence %% at every turn",
                       description="For each checkable instruction family (upper case, end with a word, at most N "
                                   "words, mention a word, start with a phrase): the instruction as the system "
                                   "message, user turns from held-out dialogues, greedy answers turn by turn (the "
                                   "oldest exchanges dropped when the context is full, the system message kept); "
                                   "prints a Markdown table of the % of dialogues whose answer passes at each turn.")
    g.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory or training run")
    g.add_argument("--turns", type=int, default=20, help="turns per dialogue (default 20)")
    g.add_argument("--dialogues", type=int, default=16, help="dialogues per family (default 16)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (default 32)")
    g.add_argument("--output", type=Path, default=None, help="write the result as JSON here, and a PNG beside it")
    g.add_argument("--attention", type=Path, default=None, metavar="PNG",
                   help="also draw the attention mass of the last turn on the system message, per layer (Figure 10)")
    g.add_argument("--data", default=None, metavar="JSONL",
                   help="held-out dialogues whose user turns are asked (e.g. builtin:world/sft.val.jsonl for a model "
                        "of the built-in world; default: the built-in dialogues' held-out file)")
    g.add_argument("--families", default=None,
                   help="comma-separated instruction families (default: every checkable and registered one)")
    g.add_argument("--seed", type=int, default=0,
                   help="draws the dialogues' later turns and each dialogue's instruction (default 0)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    g.set_defaults(func=gatt_handler)


def gatt_handler(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..errors import Llama2Error
    from ..eval.adherence import adherence_plot, adherence_report, adherence_table

    if args.turns < 1 or args.dialogues < 1:
        raise Llama2Error("--turns and --dialogues must be at least 1")
    if not Path(args.checkpoint).exists():
        raise Llama2Error(f"checkpoint {args.checkpoint} does not exist; check the path")
    from ..data.instructions import CHECKABLE, USER_FAMILIES
    from ..data.world import data_path

    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    unknown = [f for f in families or [] if f not in CHECKABLE and f not in USER_FAMILIES]
    if unknown:
        raise Llama2Error(f"--families: {unknown} not checkable instruction families; use some of "
                          f"{list(CHECKABLE) + list(USER_FAMILIES)}")
    source = data_path(args.data) if args.data else None
    if source is not None and not source.is_file():
        raise Llama2Error(f"--data: {source} does not exist; give a dialogues JSONL file")
    report = adherence_report(args.checkpoint, args.turns, args.dialogues, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, device=args.device, families=families,
                              source=source)
    sys.stdout.write(adherence_table({"model": report}) + "\n")
    if args.output is not None:
        atomic_write_text(args.output, json.dumps(report, indent=1))
        adherence_plot({"model": report}, args.output.with_suffix(".png"))
    if args.attention is not None:
        from ..checkpoint import load_checkpoint
        from ..eval.adherence import attention_figure
        from ..data.instructions import start_with
        from ..checkpoint.runs import load_tokenizer

        ckpt = Path(report["checkpoint"])
        dialogue = [{"role": "system", "content": start_with("Well,").text},
                    {"role": "user", "content": "What does len() return?"},
                    {"role": "assistant", "content": "Well, the number of items."},
                    {"role": "user", "content": "And what does sorted() return?"}]
        attention_figure({"model": load_checkpoint(ckpt, kind="causal_lm").eval()}, load_tokenizer(ckpt), dialogue,
                         args.attention)
    return 0
