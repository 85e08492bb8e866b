"""Continuous batching: 16 concurrent requests through the engine against the same 16 requests one at a time.

    .venv/bin/python benchmarks/engine.py                       # 5M preset shape, random weights, 1 thread
    .venv/bin/python benchmarks/engine.py --model tiny --threads 2 --repeats 3
    .venv/bin/python benchmarks/engine.py --model tiny --compile   # both sides through torch.compile

The requests have different prompt lengths and sampling settings: half greedy, half seeded sampling with
different temperatures, top-p and top-k, and different max_new_tokens. "engine" runs them as one
`Generator.generate(prompts, params)` call with 16 slots (each request is prefilled into a free slot, all active
slots decode in one forward per step, finished requests leave); "one at a time" runs each request alone with a
1-slot Generator (batch-1 steps, through the fp32 matrix-vector kernel where it builds). Both count generated
tokens over wall time, prefills included; rounds alternate, and the medians and the median of the rounds' ratios
(the two runs of a round are back to back, which evens out a shared machine's load) are reported, and the same
ratio in process CPU time (with one thread, the work done, less sensitive to other processes on a shared machine
than wall time). Also: whether every request's tokens (greedy and seeded) are identical both ways. --compile:
both Generators decode through torch.compile (fixed shapes: every slot and position each step; compiled during
the warm-up run, which is not timed). This is a script, not a test.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from decode import Tok  # a token-ids-only tokenizer stub (benchmarks/ is on sys.path when run as a script)
from llama2.cpu import cpu_banner


def requests(n: int, vocab: int, seed: int = 0):
    """n prompts of 4..64 tokens with varied SamplingParams (stop_ids=[]: every request runs to its length)."""
    from llama2.inference.generate import SamplingParams

    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append([1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 64))])
        max_new = rng.choice([24, 48, 64, 96, 128])
        if i % 2 == 0:
            params.append(SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_ids=[]))
        else:
            params.append(SamplingParams(temperature=rng.choice([0.6, 0.8, 1.0, 1.3]),
                                         top_p=rng.choice([0.9, 0.95, 1.0]), top_k=rng.choice([0, 0, 40]),
                                         max_new_tokens=max_new, seed=1000 + i, stop_ids=[]))
    return prompts, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="5M", help="a ModelConfig preset (random weights): 5M (default), tiny, 25M")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both runs (default 1)")
    ap.add_argument("--compile", action="store_true", help="both sides decode through torch.compile")
    args = ap.parse_args()

    from llama2.config import ModelConfig
    from llama2.inference.generate import Generator
    from llama2.model import Transformer

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_banner()}")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    cfg = ModelConfig.from_name(args.model)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompts, params = requests(args.requests, cfg.vocab_size)
    total = sum(p.max_new_tokens for p in params)
    greedy = sum(p.temperature == 0 for p in params)
    print(f"model {args.model}: dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
          f"{n_params / 1e6:.1f}M parameters; {args.requests} requests ({greedy} greedy, "
          f"{args.requests - greedy} seeded sampling), prompts {min(map(len, prompts))}..{max(map(len, prompts))} "
          f"tokens, {total} new tokens in all")

    batched = Generator(model, Tok(), max_batch_size=args.requests, cache_len=256, compile=args.compile)
    single = Generator(model, Tok(), max_batch_size=1, cache_len=256, compile=args.compile)
    if args.compile:
        print("torch.compile: both sides (compiled in the untimed warm-up run)")

    def run_engine():
        return batched.generate(prompts, params)

    def run_alone():
        return [single.generate([p], q)[0] for p, q in zip(prompts, params)]

    runs = {"engine (16 slots)": run_engine, "one at a time": run_alone}
    outputs = {k: fn() for k, fn in runs.items()}  # warm-up, and the outputs compared below
    rates: dict[str, list[float]] = {k: [] for k in runs}
    cpu_rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            n = sum(len(c.tokens) for c in out)
            rates[k].append(n / (time.perf_counter() - t0))
            cpu_rates[k].append(n / (time.process_time() - c0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    a, b = outputs["engine (16 slots)"], outputs["one at a time"]
    same = [x.tokens == y.tokens for x, y in zip(a, b)]
    same_greedy = all(s for s, p in zip(same, params) if p.temperature == 0)
    same_sampled = sum(s for s, p in zip(same, params) if p.temperature > 0)
    print(f"\n{'run':20s} {'tok/s':>9s}   (median of {args.repeats}; all rounds: tok/s)")
    for k, v in med.items():
        print(f"{k:20s} {v:9.1f}   " + ", ".join(f"{r:.1f}" for r in rates[k]))
    per_round = [e / o for e, o in zip(rates["engine (16 slots)"], rates["one at a time"])]
    print(f"ratio engine / one at a time: {med['engine (16 slots)'] / med['one at a time']:.2f}x of the medians, "
          f"{statistics.median(per_round):.2f}x median of the rounds' ratios "
          f"({', '.join(f'{r:.2f}' for r in per_round)}; goal >= 5x)")
    cpu_round = [e / o for e, o in zip(cpu_rates["engine (16 slots)"], cpu_rates["one at a time"])]
    print(f"in process CPU time: engine {statistics.median(cpu_rates['engine (16 slots)']):.1f} tok/s, one at a "
          f"time {statistics.median(cpu_rates['one at a time']):.1f} tok/s, {statistics.median(cpu_round):.2f}x "
          f"median of the rounds' ratios ({', '.join(f'{r:.2f}' for r in cpu_round)})")
    print(f"greedy outputs identical: {'yes' if same_greedy else 'NO'} ({greedy} requests); seeded samples "
          f"identical: {same_sampled} of {args.requests - greedy}")


if __name__ == "__main__":
    main()
