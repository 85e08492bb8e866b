"""`llama2 generate CKPT --prompt TEXT`: complete a prompt, streaming only the completion to stdout."""

from __future__ import annotations

import argparse
import sys

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
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise Llama2Error(f"checkpoint directory {ckpt} does not exist; check the path")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = Tokenizer(ckpt)
    model = load_model(ckpt, device, dtype)
    generator = Generator(model, tokenizer, max_batch_size=1, quantize=args.quantize, compile=args.compile)
    out = sys.stdout
    for piece in generator.stream(tokenizer.encode(prompt, bos=True), params):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return 0
