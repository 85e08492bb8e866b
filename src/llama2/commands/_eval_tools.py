"""`llama2 eval tools CKPT [CKPT ...]`: problems answered without and with tools (the paper's Table 15), on the
built-in world's held-out tool questions or a local ASDiv / SVAMP / MAWPS file (one `llama2 eval` subcommand)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("tools", help="accuracy without and with tools (calculator, search)",
                       description="Each checkpoint answers each problem twice, greedy: without tools, and with the "
                                   "tools listed in the system message and run by the engine when the model calls "
                                   "them. An answer is right when the last number after its last tool result is the "
                                   "gold number. Prints accuracy with 95%% Wilson intervals, the share of answers "
                                   "that called a tool and of calls that were well formed.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint directories or training runs")
    p.add_argument("--task", default="world",
                   help="world (the built-in world's held-out calculation and lookup questions), or FORMAT:PATH "
                        "with FORMAT asdiv, svamp or mawps (a local file in that set's usual shape)")
    p.add_argument("--tools", default=None,
                   help="comma-separated tools: calculator, search, module:function (default: calculator and "
                        "search for the world, calculator for a file)")
    p.add_argument("--per-family", type=int, default=200, help="problems per family (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer, tool results included "
                                                                    "(default 256)")
    p.add_argument("--output", type=Path, default=None, help="write every answer, call and figure as JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..data.jsonl import read_jsonl
    from ..data.world.files import data_path
    from ..errors import Llama2Error
    from ..eval.harness import Settings, existing_checkpoint, load_for_eval
    from ..eval.tools import read_problems, tool_eval, world_problems
    from ..tools import load_tools

    if args.per_family < 1:
        raise Llama2Error("--per-family must be at least 1")
    world = args.task == "world"
    if world:
        problems = world_problems(args.per_family)
    else:
        fmt, sep, path = args.task.partition(":")
        if not sep:
            raise Llama2Error(f"--task {args.task!r}: give world or FORMAT:PATH (asdiv, svamp or mawps)")
        problems, skipped = read_problems(path, fmt)
        problems = problems[:args.per_family]
        if skipped:
            print(f"{path}: {skipped} problems without a numeric answer left out")
    names = args.tools or ("calculator,search" if world else "calculator")

    def documents() -> list[str]:
        return [obj["text"] for _, obj in read_jsonl(data_path("builtin:world/search.jsonl"))]

    toolbox = load_tools(names, documents=documents)
    runs = {}
    for ckpt in args.checkpoints:
        model, tok = load_for_eval(existing_checkpoint(ckpt), Settings())
        runs[ckpt] = tool_eval(model, tok, problems, toolbox, max_new_tokens=args.max_new_tokens, quiet=False)
    lines = ["| model | family | n | without tools | with tools | answers with a call | well-formed calls |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        for family, s in list(run.by_family().items()) + [("all", run.summary())]:
            cells = []
            for mode in ("without", "with"):
                lo, hi = s[mode]["ci95"]
                cells.append(f"{100 * s[mode]['accuracy']:.1f} [{100 * lo:.0f}-{100 * hi:.0f}]")
            wf = "-" if s["well_formed"] is None else f"{100 * s['well_formed']:.1f}"
            lines.append(f"| {name} | {family} | {s['n']} | {cells[0]} | {cells[1]} | "
                         f"{100 * s['answers_with_a_call']:.1f} | {wf} |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.output is not None:
        atomic_write_text(args.output, json.dumps({n: {"summary": r.summary(), "by_family": r.by_family(),
                                                       "answers": r.rows} for n, r in runs.items()}, indent=1))
        print(f"wrote {args.output}")
    return 0
