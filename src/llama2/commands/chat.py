"""`llama2 chat CKPT`: chat with a checkpoint in the terminal (or line by line through a pipe)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..device import add_device_args
from ._options import add_sampling_args, sampling_params


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Interactive chat in the Llama 2 chat format. Commands: /reset, /system TEXT, /exit (or "
                    "Ctrl-D). Ctrl-C stops an answer (the partial answer is kept). With stdin not a terminal, "
                    "each input line is a user message and each answer is printed on one line, with \\n for "
                    "newlines and \\\\ for backslashes.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (Hugging Face layout with tokenizer.model)")
    p.add_argument("--system", default=None, help="system prompt (default: none, as Meta's reference code)")
    add_sampling_args(p, max_new_tokens=512, seed_help="random seed; answer i uses seed + i (default: random)")
    p.add_argument("--tools", default=None,
                   help="tools the model may call, run as it calls them and shown with their results: "
                        "calculator, search, module:function (comma-separated)")
    p.add_argument("--documents", default="builtin:world/search.jsonl",
                   help="what the search tool searches: .jsonl files ({\"text\": ...} per line), .txt files (one "
                        "document each) or a directory of them (default: the built-in world's directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar while the checkpoint loads")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 linear layers (faster decoding on CPU, approximate)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (slow start, faster tokens)")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..chat_session import ChatSession, InterruptGuard, run_chat
    from ..checkpoint import load_model
    from ..device import resolve_device, resolve_dtype
    from ..inference.generate import Generator
    from ..tokenizer import Tokenizer

    base = sampling_params(args)  # checks the flags before the model loads
    toolbox = load_toolbox(args.tools, args.documents) if args.tools else None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = Tokenizer(args.checkpoint)
    model = load_model(args.checkpoint, device, dtype, progress=not args.quiet)
    session = ChatSession(tokenizer, max_seq_len=model.config.max_seq_len, max_new_tokens=args.max_new_tokens,
                          system=args.system, tools=toolbox.specs if toolbox else None)
    # the prefix cache keeps the conversation so far: each turn computes only its new message
    generator = Generator(model, tokenizer, max_batch_size=1, quantize=args.quantize, compile=args.compile,
                          prefix_cache=model.config.max_seq_len)

    def respond(tokens: list[int], index: int):
        """Stream the answer; say so on stderr when it was cut at --max-new-tokens rather than finished."""
        seed = None if args.seed is None else args.seed + index
        params = dataclasses.replace(base, seed=seed, tools=toolbox)
        completion = yield from generator.stream(tokens, params)
        if completion.finish_reason == "length":
            note = f"[answer cut at --max-new-tokens {args.max_new_tokens}]"
            sys.stderr.write(f" {note}" if interactive else f"note: {note}\n")
            sys.stderr.flush()

    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the model as U+FFFD, not a traceback
        sys.stdin.reconfigure(errors="replace")
    guard = InterruptGuard()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        guard.install()
        print(f"llama2 chat: {args.checkpoint} ({model.config.max_seq_len}-token context). /reset clears the "
              "history, /system TEXT sets the system prompt, /exit or Ctrl-D quits, Ctrl-C stops an answer.",
              flush=True)

    def read_line(prompt: str) -> str:
        if interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return run_chat(session, respond, read_line=read_line, out=sys.stdout, err=sys.stderr,
                    interactive=interactive, guard=guard)


def load_toolbox(names: str, documents: str):
    """The tools of --tools; search reads --documents (data.sources.file_documents) only when asked for."""
    from ..data.sources import file_documents
    from ..data.world.files import data_path
    from ..tools import load_tools

    return load_tools(names, documents=lambda: list(file_documents([data_path(documents)])))
