"""Constrained decoding's cost: decode throughput at a steady batch of 16 requests with a JSON Schema enforced
(llguidance's token mask in every step) against the same engine unconstrained.

    .venv/bin/python benchmarks/structured.py                    # tiny shape, Llama 2's 32,000-piece vocabulary
    .venv/bin/python benchmarks/structured.py --shape 1.1b --steps 40

Random weights of the named shape (benchmarks/decode.py's shapes) with the real Llama 2 vocabulary (the
SentencePiece model rebuilt from llama.cpp's ggml-vocab-llama-spm.gguf, which the test setup downloads with the
llama-cpp-python sdist), so the mask covers 32,000 tokens as it would for a real checkpoint. Each side keeps 16
requests in the engine (a finished request is replaced at once, as a busy server's would be), samples at
temperature 1, and counts generated tokens over wall time for --steps steps after a warm-up; rounds alternate
and the median of the per-round ratios is reported. Also: the share of the constrained answers that parse and
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


def steady_throughput(engine, prompt: list[int], params, steps: int) -> tuple[float, list[str]]:
    """Tokens per second over `steps` steps with every slot kept busy; the finished texts."""
    slots = engine.max_slots
    texts: list[str] = []
    tokens = 0
    t0 = None
    for step in range(steps + 3):  # 3 warm-up steps (first prefills) are not timed
        while len(engine.active) < slots:
            engine.add(prompt, params)
        if step == 3:
            t0, tokens = time.perf_counter(), 0
        for ev in engine.step():
            tokens += ev.token is not None
            if ev.completion is not None and ev.completion.finish_reason == "stop":
                texts.append(ev.completion.text)
    seconds = time.perf_counter() - t0
    for slot in engine.active:
        engine.cancel(slot)
    return tokens / seconds, texts


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
    finished: list[str] = []
    for _ in range(args.repeats):
        rates["unconstrained"].append(steady_throughput(engine, prompt, plain, args.steps)[0])
        rate, texts = steady_throughput(engine, prompt, constrained, args.steps)
        rates["json_schema"].append(rate)
        finished += texts
    valid = 0
    for t in finished:
        try:
            jsonschema.validate(json.loads(t), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            print("INVALID:", repr(t))
    ratios = [c / u for c, u in zip(rates["json_schema"], rates["unconstrained"])]
    print(f"shape {args.shape} (vocab 32000), batch 16 kept full, {args.steps} steps x {args.repeats} rounds, "
          f"{args.threads} thread(s)")
    for name, r in rates.items():
        print(f"  {name:14s} {statistics.median(r):8.1f} tokens/s  (rounds: {', '.join(f'{x:.1f}' for x in r)})")
    print(f"  constrained / unconstrained: {statistics.median(ratios):.3f}x  (goal >= 0.85x: < 15% slower)")
    print(f"  finished constrained answers: {len(finished)}, parse and validate: {valid} "
          f"({100 * valid / max(1, len(finished)):.0f}%)")
    if finished:
        print(f"  e.g. {finished[0]}")


if __name__ == "__main__":
    main()
