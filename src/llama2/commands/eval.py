"""`llama2 eval ...`: evaluations of a checkpoint. Each subcommand lives in its own module `commands/_eval_NAME.py`
with a `register(sub)`; `llama2 eval CKPT --tasks ...` (no subcommand named) is the benchmark harness, the
subcommand `run`."""

from __future__ import annotations

import importlib
import pkgutil

from .. import commands

HARNESS = "run"  # the subcommand `llama2 eval CKPT --tasks ...` stands for


def subcommand_modules() -> list[str]:
    """The modules `llama2.commands._eval_*`, sorted."""
    return sorted(f"{commands.__name__}.{m.name}" for m in pkgutil.iter_modules(commands.__path__)
                  if m.name.startswith("_eval_"))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: benchmark tasks, code, red teaming, model comparison, GAtt",
        description="Evaluations of a checkpoint. `llama2 eval CKPT --tasks NAMES` runs benchmark tasks; the "
                    "subcommands below run the other evaluations.")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    for name in subcommand_modules():
        importlib.import_module(name).register(sub)


def normalize_argv(argv: list[str]) -> list[str]:
    """`eval CKPT ...` -> `eval run CKPT ...` when CKPT is not a subcommand's name (so a checkpoint may be named
    anything but `gatt`, `run`, ...: write `./gatt` for one that is)."""
    if len(argv) >= 2 and argv[0] == "eval" and not argv[1].startswith("-"):
        names = {m.rsplit("._eval_", 1)[1].replace("_", "-") for m in subcommand_modules()}
        if argv[1] not in names:
            return [argv[0], HARNESS, *argv[1:]]
    return argv
