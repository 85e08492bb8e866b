"""Constrained decoding's cost: decode throughput at a steady batch of 16 requests with a JSON Schema enforced
(llguidance's token mask in every step) against the same engine unconstrained.

    .venv/bin/python benchmarks/structured.py                    # tiny shape, Llama 2's 32,000-piece vocabulary
    .venv/bin/python benchmarks/structured.py --shape 1.1b --steps 40

Random weights of the named shape (benchmarks/decode.py's shapes) with the real Llama 2 vocabulary (the
SentencePiece model rebuilt from llama.cpp's ggml-vocab-llama-spm.gguf, which the test setup downloads with the
llama-cpp-python sdist), so the mask covers 32,000 tokens as it would for a real checkpoint. Each side keeps 16
requests in the engine (a finished request is replaced at once, as a busy server's would be), samples at
temperature 1, and counts generated tokens over wall time for --steps steps after a warm-up; rounds alternate
and the median of the per-round ratios is reported, overall and over the steps where no request joined (the
constrained answers finish early and are replaced, so that side prefills more; the decode-step ratio is the
mask's own cost). Also: the share of the constrained answers that parse and
validate against the schema (every finished one must). The peer a user would otherwise pick, vLLM with
structured outputs, does not run on this machine's CPU build here; the goal is relative to our own unconstrained
step (< 15% slower). This is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from decode import LLAMA_CPP, SHAPES  # benchmarks/ is on sys.path when run as a script
from llama2.cpu import cpu_banner

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["name", "age", "pets"], "additionalProperties": False}


def steady_throughput(engine, prompt: list[int], params, steps: int) -> tuple[float, float, list[str]]:
    """(tokens per second over `steps` steps with every slot kept busy, the same over the steps that only decoded
    (no request joined: what the mask adds to a decode step), the finished texts)."""
    slots = engine.max_slots
    texts: list[str] = []
    tokens = decode_tokens = 0
    seconds = decode_seconds = 0.0
    for step in range(steps + 3):  # 3 warm-up steps (the first prefills) are not timed
        joined = False
        while len(engine.active) < slots:
            engine.add(prompt, params)
            joined = True
        t0 = time.perf_counter()
        events = engine.step()
        dt = time.perf_counter() - t0
        n = sum(ev.token is not None for ev in events)
        if step >= 3:
            tokens, seconds = tokens + n, seconds + dt
            if not joined:
                decode_tokens, decode_seconds = decode_tokens + n, decode_seconds + dt
        texts += [ev.completion.text for ev in events
                  if ev.completion is not None and ev.completion.finish_reason == "stop"]
    for slot in engine.active:
        engine.cancel(slot)
    return tokens / seconds, decode_tokens / max(decode_seconds, 1e-9), texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from llama2.config import ModelConfig
    from llama2.inference.generate import Generator, SamplingParams
    from llama2.inference.grammar import Grammar
    from llama2.model import Transformer
    from llama2.tokenizer import tokenizer_from_gguf

    import jsonschema

    torch.set_num_threads(args.threads)
    print(cpu_banner())
    vocab = LLAMA_CPP / "models" / "ggml-vocab-llama-spm.gguf"
    if not vocab.is_file():
        raise SystemExit(f"{vocab} is missing: run the test suite once (./run test) to fetch the llama-cpp-python "
                         "sdist it comes in")
    shape = SHAPES[args.shape]
    cfg = ModelConfig(dim=shape["hidden_size"], n_layers=shape["num_hidden_layers"],
                      n_heads=shape["num_attention_heads"], n_kv_heads=shape["num_key_value_heads"],
                      hidden_dim=shape["intermediate_size"], vocab_size=32000, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer_from_gguf(vocab, Path(tmp))
    prompt = tok.encode("A person as JSON:", bos=True)
    plain = SamplingParams(temperature=1.0, max_new_tokens=96, stop_ids=[])
    constrained = SamplingParams(temperature=1.0, max_new_tokens=96, grammar=Grammar("json_schema",
                                                                                     json.dumps(SCHEMA)))
    engine = Generator(model, tok, max_batch_size=16).engine(16)
    rates: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    decode: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    finished: list[str] = []
    for _ in range(args.repeats):
        for name, params in (("unconstrained", plain), ("json_schema", constrained)):
            rate, decode_rate, texts = steady_throughput(engine, prompt, params, args.steps)
            rates[name].append(rate)
            decode[name].append(decode_rate)
            if name == "json_schema":
                finished += texts
    valid = 0
    for t in finished:
        try:
            jsonschema.validate(json.loads(t), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            print("INVALID:", repr(t))
    ratio = statistics.median(c / u for c, u in zip(rates["json_schema"], rates["unconstrained"]))
    decode_ratio = statistics.median(c / u for c, u in zip(decode["json_schema"], decode["unconstrained"]))
    print(f"shape {args.shape} (vocab 32000), batch 16 kept full, {args.steps} steps x {args.repeats} rounds, "
          f"{args.threads} thread(s)")
    for name in rates:
        print(f"  {name:14s} {statistics.median(rates[name]):8.1f} tokens/s overall, "
              f"{statistics.median(decode[name]):8.1f} tokens/s in steps without a joining request")
    print(f"  constrained / unconstrained, decode steps: {decode_ratio:.3f}x  (goal >= 0.85x: < 15% slower)")
    print(f"  constrained / unconstrained, overall: {ratio:.3f}x  (constrained answers finish early, so more "
          "requests join and prefill)")
    print(f"  finished constrained answers: {len(finished)}, parse and validate: {valid} "
          f"({100 * valid / max(1, len(finished)):.0f}%)")
    if finished:
        print(f"  e.g. {finished[0]}")


if __name__ == "__main__":
    main()
