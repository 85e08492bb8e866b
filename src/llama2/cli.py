"""`llama2 <verb>`: every module in llama2.commands (but those named `_*`, shared helpers) registers its own
subcommand."""

from __future__ import annotations

import argparse
import os
import importlib
import importlib.util
import pkgutil
import sys

from . import commands
from .errors import Llama2Error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama2", description="The Llama 2 system: models, training, RLHF, chat.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # shared helpers (commands/_options.py), not subcommands
            continue
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # a command may rewrite its own shorthand forms
        module = f"{commands.__name__}.{argv[0]}"
        if importlib.util.find_spec(module) is not None:
            argv = getattr(importlib.import_module(module), "normalize_argv", lambda a: a)(argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Llama2Error as e:
        print(f"llama2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llama2: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`llama2 ... | head`): stop quietly, as a killed writer would
        sys.stdout = open(os.devnull, "w")
        return 141
    except OSError as e:  # a file the command reads or writes: name it and the reason, never a traceback
        where = f" {e.filename}" if e.filename else ""
        print(f"llama2: error: cannot use{where}: {e.strerror or e}; check the path and its permissions",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
