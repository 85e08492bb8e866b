"""`llama2 eval gold CKPT [CKPT ...]`: gold accuracy in the built-in world, per question family, model against
model (one `llama2 eval` subcommand)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.world.items import ANSWER_TOKENS


def register(sub) -> None:
    p = sub.add_parser("gold", help="gold accuracy on the built-in world's held-out questions",
                       description="Each checkpoint answers the built-in world's held-out questions (greedy); the "
                                   "world's gold judge marks every answer, without any model. Prints gold accuracy "
                                   "per question family with 95%% Wilson intervals, one column per checkpoint, and "
                                   "the violation and false-refusal rates of the safety families.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint directories or training runs")
    p.add_argument("--families", default=None,
                   help="comma-separated families (default: all: fact, temporal, arithmetic, list, word, multi_step, "
                        "follow_up, harmful, benign)")
    p.add_argument("--per-family", type=int, default=100, help="held-out questions per family (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=ANSWER_TOKENS,
                   help=f"tokens per answer (default {ANSWER_TOKENS}: the world's longest answer fits)")
    p.add_argument("--output", type=Path, default=None, help="write every judged answer and the figures as JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..data.world import load_world, read_gold
    from ..data.world.files import data_path
    from ..data.world.items import check_families
    from ..errors import Llama2Error
    from ..eval.gold import gold_eval, pick, safety_rates
    from ..eval.harness import Settings, existing_checkpoint, load_for_eval

    if args.per_family < 1:
        raise Llama2Error("--per-family must be at least 1")
    families = check_families(args.families.split(",")) if args.families else None
    world = load_world()
    items = pick(read_gold(data_path("builtin:world/gold.val.jsonl")), args.per_family, families=families)
    runs = {}
    for ckpt in args.checkpoints:
        path = existing_checkpoint(ckpt)
        model, tok = load_for_eval(path, Settings())
        runs[ckpt] = gold_eval(model, tok, world, items, max_new_tokens=args.max_new_tokens)
    names = list(runs)
    rates = {n: safety_rates(r) for n, r in runs.items()}  # each run's violation and false-refusal rates, once
    fams = sorted({i.family for i in items})
    lines = ["| family | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for f in fams + ["all"]:
        cells = []
        for r in runs.values():
            s = r.summary() if f == "all" else r.by_family[f]
            lo, hi = s["ci95"]
            cells.append(f"{100 * s['accuracy']:.1f} [{100 * lo:.0f}-{100 * hi:.0f}]")
        n = len(items) if f == "all" else runs[names[0]].by_family[f]["n"]
        lines.append(f"| {f} | {n} | " + " | ".join(cells) + " |")
    if {"harmful", "benign"} & set(fams):
        for key, label in (("violations", "violations"), ("false_refusals", "false refusals")):
            cells = [rates[n][key]["rate"] for n in names]
            lines.append(f"| {label} (%) | | " + " | ".join("-" if x is None else f"{100 * x:.1f}" for x in cells)
                         + " |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.output is not None:
        atomic_write_text(args.output, json.dumps({n: {"summary": r.summary(), "safety": rates[n],
                                                       "answers": r.rows()} for n, r in runs.items()}, indent=1))
        print(f"wrote {args.output}")
    return 0
