"""`llama2 eval compare CKPT_A CKPT_B --judge RM`: win / tie / loss of A's answers over B's as judged by a reward
model (one `llama2 eval` subcommand)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("compare", help="win/tie/loss of model A over model B, judged by a reward model",
                       description="Both models answer the same prompts (the built-in held-out prompts unless "
                                   "--prompts), the reward model scores every answer alone (p = sigmoid(score)); "
                                   "A wins a prompt when p_A - p_B > --tie-margin, loses when p_B - p_A > it, else "
                                   "a tie. Prints a Markdown table: counts and A's win rate over non-ties with a "
                                   "95%% Wilson interval, per prompt kind. An RM never sees the two answers "
                                   "together, so the order of A and B cannot matter (swapping them mirrors the "
                                   "result).")
    p.add_argument("a", metavar="CKPT_A", help="model A: checkpoint directory or training run")
    p.add_argument("b", metavar="CKPT_B", help="model B: checkpoint directory or training run")
    p.add_argument("--judge", required=True, metavar="RM", help="the reward model that judges (its directory)")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="prompts as JSONL (llama2.data.prompts' format; default: the built-in held-out prompts)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens per answer (default 128)")
    p.add_argument("--temperature", type=float, default=0.1, help="sampling temperature (default 0.1; 0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i (default 0)")
    p.add_argument("--tie-margin", type=float, default=None, metavar="M",
                   help="|p_A - p_B| at most M is a tie (default 0.01)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE.md",
                   help="write the table here, the bar chart beside it (.png) and every answer (.jsonl)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=compare_handler)


def compare_handler(args: argparse.Namespace) -> int:
    from ..data.prompts import builtin_prompts, read_prompts, take
    from ..errors import Llama2Error
    from ..eval.compare import TIE_MARGIN, compare_models, write_comparison

    if args.limit is not None and args.limit < 1:
        raise Llama2Error(f"--limit must be at least 1, got {args.limit}")
    if args.max_new_tokens < 1:
        raise Llama2Error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    for path in (args.a, args.b, args.judge):
        if not Path(path).exists():
            raise Llama2Error(f"{path} does not exist; give a checkpoint directory or training run")
    if args.output is not None and args.output.suffix != ".md":
        raise Llama2Error(f"--output must name a Markdown file (FILE.md), got {args.output}")
    prompts = read_prompts(args.prompts) if args.prompts is not None else builtin_prompts(quiet=args.quiet)[1]
    prompts = take(prompts, args.limit)
    cmp = compare_models(args.a, args.b, args.judge, prompts, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         margin=TIE_MARGIN if args.tie_margin is None else args.tie_margin, device=args.device,
                         quiet=args.quiet)
    sys.stdout.write(cmp.markdown())
    if args.output is not None:
        for path in write_comparison(cmp, args.output):
            print(f"wrote {path}", file=sys.stderr)
    return 0
