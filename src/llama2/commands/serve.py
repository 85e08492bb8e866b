"""`llama2 serve CKPT`: an OpenAI-compatible HTTP server (continuous batching, streaming, a web chat page)."""

from __future__ import annotations

import argparse
import sys

from ..device import add_device_args
from ._options import add_sampling_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (with a web chat page)",
        description="Serve a checkpoint on /v1/chat/completions, /v1/completions, /v1/models, /health and "
                    "/metrics, with a chat page at /. Concurrent requests share decode steps (continuous "
                    "batching). Listens on 127.0.0.1 unless --host says otherwise. The sampling flags are the "
                    "defaults for requests that leave those fields out.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (Hugging Face or Meta layout, "
                                                      "with tokenizer.model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                                                   "(default: the LLAMA2_API_KEY environment variable, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint "
                                                      "directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a slot before answering 429 (default 64)")
    p.add_argument("--context", type=int, default=None,
                   help="positions per request, prompt + completion (default: the model's max_seq_len)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20,
                   help="largest request body accepted, else 413 (default 1 MiB)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 linear layers (faster decoding on CPU, approximate)")
    p.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    p.add_argument("--prefix-cache", type=int, default=None, metavar="POSITIONS",
                   help="keys and values of prompt prefixes kept across requests (a shared system prompt, a chat's "
                        "earlier turns), in positions (default: one context's worth; 0: none)")
    p.add_argument("--lora", "--lora-modules", action="append", nargs="+", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter (PEFT layout; a LoRA run stands for its latest checkpoint) beside the "
                        "model: "
                        "requests whose model is NAME run with it, in the same batches as the others; repeat for "
                        "more (vLLM's --lora-modules form is accepted too)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    add_sampling_args(p, max_new_tokens=256)
    add_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ..errors import Llama2Error
    from ._options import sampling_params

    base = sampling_params(args)  # checks the sampling flags before anything loads
    if not 0 <= args.port <= 65535:
        raise Llama2Error(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise Llama2Error(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise Llama2Error(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.prefix_cache is not None and args.prefix_cache != 0 and args.prefix_cache < 16:
        raise Llama2Error(f"--prefix-cache must be 0 (none) or at least 16 positions (one block), got "
                          f"{args.prefix_cache}")
    if args.max_request_bytes < 1024:
        raise Llama2Error(f"--max-request-bytes must be >= 1024, got {args.max_request_bytes}")
    if base.max_new_tokens < 1:
        raise Llama2Error("--max-new-tokens must be >= 1 for a server")
    adapters = adapter_options(args.lora)
    ckpt = Path(args.checkpoint).expanduser()
    if not ckpt.is_dir():
        raise Llama2Error(f"checkpoint directory {ckpt} does not exist; check the path")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise Llama2Error(f"llama2 serve needs fastapi and uvicorn ({e.name} is missing); "
                          "pip install fastapi uvicorn") from None

    from ..checkpoint import load_model
    from ..device import resolve_device, resolve_dtype
    from ..serve import Defaults, ServeOptions, bind, build_app
    from ..serve import server as srv
    from ..tokenizer import Tokenizer

    sock = bind(args.host, args.port)  # fail on a taken port before loading the model
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = Tokenizer(ckpt)
    model = load_model(ckpt, device, dtype)
    if args.context is not None and not 0 < args.context <= 2 * model.config.max_seq_len:
        raise Llama2Error(f"--context must be in 1..{2 * model.config.max_seq_len} for this model, got "
                          f"{args.context}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LLAMA2_API_KEY") or None
    name = args.model_name or ckpt.resolve().name
    options = ServeOptions(model_name=name, max_batch=args.max_batch, max_queue=args.max_queue,
                           context=args.context, quantize=None if args.quantize == "none" else args.quantize,
                           compile=args.compile, prefix_cache=args.prefix_cache, api_key=api_key,
                           max_request_bytes=args.max_request_bytes, adapters=adapters,
                           defaults=Defaults(base.temperature, base.top_p, base.top_k, base.max_new_tokens))
    app = build_app(model, tokenizer, options)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    also = f", adapters {', '.join(repr(a) for a in adapters)}" if adapters else ""
    print(f"llama2 serve: model {name!r}{also} on http://{shown}:{port} (chat page at /, OpenAI API at /v1, "
          f"{args.max_batch} slots{', API key required' if api_key else ''}); Ctrl-C stops", file=sys.stderr,
          flush=True)
    srv._uvicorn(app, args.log_level).run(sockets=[sock])
    return 0


def adapter_options(values: list[list[str]]) -> dict:
    """--lora NAME=PATH ... as {name: Path}; a malformed item, a repeated name or a path that is not an adapter
    directory is an error."""
    from pathlib import Path

    from ..errors import Llama2Error
    from ..paths import resolve_checkpoint

    out: dict[str, Path] = {}
    for item in (v for group in values for v in group):
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise Llama2Error(f"--lora takes NAME=PATH (an adapter directory), got {item!r}")
        if name in out:
            raise Llama2Error(f"--lora names {name!r} twice; give each adapter its own name")
        where = resolve_checkpoint(Path(path).expanduser())  # a LoRA run stands for its latest checkpoint
        if not (where / "adapter_config.json").is_file():
            raise Llama2Error(f"--lora {name}: {where} is not a LoRA adapter directory (no adapter_config.json); "
                              "give a LoRA run, or a checkpoint it saved")
        out[name] = where
    return out
