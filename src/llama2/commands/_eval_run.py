"""`llama2 eval CKPT --tasks NAMES` (the subcommand `run`): the paper's benchmarks on a checkpoint, by our harness
or by lm-evaluation-harness's tasks through our model (`--harness lm-eval`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="benchmark tasks (Table 3: code, commonsense, world knowledge, ..., MMLU, BBH, AGI Eval)",
        description="Run benchmark tasks on a checkpoint from local data files: multiple choice by log-likelihood "
                    "(acc, acc_norm), generation (exact match, F1, final number, maj@k), code (pass@k), perplexity, "
                    "TruthfulQA MC1/MC2 and classifier-scored generations. Prints the per-task metrics and Table 3's "
                    "group averages beside the paper's Llama 2 rows. Results are cached per (checkpoint content, "
                    "task, data, settings): a rerun is instant.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory or training run")
    p.add_argument("--tasks", required=True, metavar="NAMES",
                   help="comma-separated tasks or groups (table3, commonsense, code, world_knowledge, "
                        "reading_comprehension, math, safety, ...); NAME=PATH gives that task's data file")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each task")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples (default: each task's, as the paper)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward / requests decoded together")
    p.add_argument("--output", type=Path, default=None, metavar="FILE.json",
                   help="write the report as JSON here (and the Markdown tables beside it, FILE.md)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the tasks' data files are (default $LLAMA2_CACHE/eval/data)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help="int8 linear layers (default none)")
    p.add_argument("--samples", type=int, default=1, help="generations per item: maj@k (GSM8K), pass@k (code)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature when --samples > 1")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--ppl-context", type=int, default=1,
                   help="perplexity: least left context per scored token (1 = disjoint windows, as lm-eval)")
    p.add_argument("--classifier", default=None, metavar="MODULE:NAME",
                   help="ToxiGen/BOLD scorer: an object (or a factory of one) with score(texts) -> list[float]")
    p.add_argument("--no-cache", action="store_true", help="run every task again (and do not store the results)")
    p.add_argument("--harness", choices=("llama2", "lm-eval"), default="llama2",
                   help="lm-eval: run lm-evaluation-harness's tasks (--tasks are its names) through our model")
    p.add_argument("--include-path", type=Path, default=None, metavar="DIR",
                   help="--harness lm-eval: a directory of lm-eval task YAML files")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    from ..device import add_device_args

    add_device_args(p)
    p.set_defaults(func=run_handler)


def load_classifier(spec: str) -> Any:
    """MODULE:NAME -> an object with score(texts); a class or factory is called with no arguments."""
    from ..errors import Llama2Error

    module, _, name = spec.partition(":")
    if not module or not name:
        raise Llama2Error(f"--classifier {spec!r}: give MODULE:NAME, e.g. mypkg.toxicity:ToxiGenRoberta")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise Llama2Error(f"--classifier {spec!r}: cannot import it ({e})") from None
    if not hasattr(obj, "score") and callable(obj):
        obj = obj()
    if not callable(getattr(obj, "score", None)):
        raise Llama2Error(f"--classifier {spec!r} has no score(texts) method")
    return obj


def parse_tasks(text: str) -> tuple[list[str], dict[str, Path]]:
    """'mmlu,piqa=data/piqa.jsonl' -> (['mmlu', 'piqa'], {'piqa': Path(...)})."""
    from ..errors import Llama2Error
    from ..eval.tasks import ALIASES

    names, paths = [], {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, eq, path = item.partition("=")
        name = ALIASES.get(name.strip().lower(), name.strip().lower())
        if eq:
            if not path:
                raise Llama2Error(f"--tasks {item!r}: give a path after '='")
            paths[name] = Path(path)
        names.append(name)
    if not names:
        raise Llama2Error("--tasks is empty; name at least one task, e.g. --tasks mmlu")
    return names, paths


def run_handler(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_json, atomic_write_text
    from ..eval import results as R

    if args.harness == "lm-eval":
        from ..eval.lm_eval_adapter import run_lm_eval

        report = run_lm_eval(args.checkpoint, [t for t in args.tasks.split(",") if t.strip()],
                             include_path=args.include_path, limit=args.limit, shots=args.shots,
                             batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    else:
        from ..eval.harness import Settings, evaluate

        names, paths = parse_tasks(args.tasks)
        settings = Settings(limit=args.limit, shots=args.shots, batch_size=args.batch_size, quantize=args.quantize,
                            device=args.device, dtype=args.dtype, samples=args.samples,
                            temperature=args.temperature, seed=args.seed, ppl_context=args.ppl_context,
                            data_dir=args.data_dir, paths=paths,
                            classifier=load_classifier(args.classifier) if args.classifier else None,
                            classifier_name=args.classifier or "", use_cache=not args.no_cache, quiet=args.quiet)
        report = evaluate(args.checkpoint, names, settings)
    table = R.markdown(report)
    sys.stdout.write(table + "\n")
    if args.output is not None:
        atomic_write_json(args.output, report)
        atomic_write_text(args.output.with_suffix(".md"), table + "\n")
    return 0


