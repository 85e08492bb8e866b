"""`llama2 generate CKPT --prompt TEXT`: complete a prompt, streaming only the completion to stdout."""

from __future__ import annotations

import argparse
import sys
import time

from ..device import add_device_args
from ._options import add_sampling_args, sampling_params


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="complete a prompt with a checkpoint",
        description="Complete a text prompt (encoded with BOS) and stream only the completion to stdout.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (Hugging Face or Meta layout, "
                                                      "with tokenizer.model)")
    p.add_argument("--prompt", required=True, help="the prompt text; '-' reads it from stdin")
    add_sampling_args(p, max_new_tokens=256)
    p.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of a prompt too long for the context instead of failing")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 linear layers (faster decoding on CPU, approximate)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (slow start, faster tokens; long outputs)")
    p.add_argument("--stats", action="store_true",
                   help="print prompt tokens, time to first token and decoding speed to stderr at the end")
    p.add_argument("--draft", metavar="CKPT|lookup", default=None,
                   help="speculative decoding with this smaller draft model (same tokenizer), or 'lookup' (proposals "
                        "copied from the prompt and output so far: no draft model): the target's own output, fewer "
                        "target passes; prints the acceptance rate to stderr")
    p.add_argument("--draft-k", type=int, default=4, help="draft tokens proposed per target pass (default 4)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="the completion is a JSON object (constrained decoding)")
    shape.add_argument("--json-schema", metavar="FILE", default=None,
                       help="the completion is JSON valid against this JSON Schema file (constrained decoding)")
    shape.add_argument("--regex", metavar="RE", default=None, help="the completion matches this regular expression")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import load_model
    from ..device import resolve_device, resolve_dtype
    from ..errors import Llama2Error
    from ..inference.generate import Generator
    from ..tokenizer import Tokenizer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params(args, truncate=args.truncate)
    grammar = _grammar(args)
    if grammar is not None:
        if args.draft is not None:
            raise Llama2Error("--json/--json-schema/--regex constrain the sampled distribution; drop --draft")
        params = params.replace(grammar=grammar)
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise Llama2Error(f"checkpoint directory {ckpt} does not exist; check the path")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = Tokenizer(ckpt)
    model = load_model(ckpt, device, dtype)
    if args.draft is not None:
        return _speculative(args, model, tokenizer, prompt, params, device, dtype)
    generator = Generator(model, tokenizer, max_batch_size=1, quantize=args.quantize, compile=args.compile)
    out = sys.stdout
    t0 = time.perf_counter()
    pieces = generator.stream(tokenizer.encode(prompt, bos=True), params)
    while True:
        try:
            piece = next(pieces)
        except StopIteration as stop:
            done = stop.value
            break
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if args.stats:
        total = time.perf_counter() - t0
        n = len(done.tokens) - (len(done.prompt_tokens) if params.echo else 0)
        rate = (n - 1) / (total - done.ttft) if n > 1 and done.ttft is not None and total > done.ttft else 0.0
        ttft = "n/a" if done.ttft is None else f"{done.ttft:.3f} s"
        print(f"prompt {len(done.prompt_tokens)} tokens, time to first token {ttft}, {n} tokens in {total:.2f} s "
              f"({rate:.1f} tok/s after the first), finish {done.finish_reason}", file=sys.stderr)
    return 0


def _grammar(args: argparse.Namespace):
    """The constraint --json, --json-schema or --regex asks for (None without one)."""
    from pathlib import Path

    from ..errors import Llama2Error
    from ..inference.grammar import Grammar

    if args.json:
        return Grammar("json_object")
    if args.regex is not None:
        return Grammar("regex", args.regex)
    if args.json_schema is not None:
        path = Path(args.json_schema)
        if not path.is_file():
            raise Llama2Error(f"--json-schema {path}: no such file; give a JSON Schema file")
        try:
            return Grammar("json_schema", path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise Llama2Error(f"--json-schema {path} is not a text file") from None
    return None


def _speculative(args: argparse.Namespace, model, tokenizer, prompt: str, params, device, dtype) -> int:
    """--draft: decode with the target and a draft model or prompt lookup (llama2.inference.speculative); the text
    at the end."""
    import dataclasses
    from pathlib import Path

    from ..checkpoint import load_model
    from ..errors import Llama2Error
    from ..inference.speculative import SpeculativeDecoder
    from ..tokenizer import decode_after

    if args.stop or args.quantize != "none" or args.compile:
        raise Llama2Error("--draft decodes with the target's own weights and stops at EOS: drop --stop, --quantize "
                          "and --compile")
    draft = None
    if args.draft != "lookup":
        if not Path(args.draft).is_dir():
            raise Llama2Error(f"draft checkpoint directory {args.draft} does not exist; check the path (or give "
                              f"--draft lookup for prompt lookup)")
        draft = load_model(Path(args.draft), device, dtype)
    params = dataclasses.replace(params, stop_ids=[tokenizer.eos_id])
    ids = tokenizer.encode(prompt, bos=True)
    out = SpeculativeDecoder(model, draft, k=args.draft_k).generate(ids, params)
    sys.stdout.write(decode_after(tokenizer, ids[-4:], out.tokens) + "\n")
    sys.stdout.flush()
    print(f"speculative decoding: {out.accepted} of {out.proposed} draft tokens accepted "
          f"({out.acceptance_rate:.0%}), {out.tokens_per_target_call:.2f} tokens per target pass", file=sys.stderr)
    return 0
