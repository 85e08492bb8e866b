"""Rollout throughput for rejection sampling: K sampled answers per prompt through our generation path against
transformers' `generate(num_return_sequences=K, do_sample=True)`, same random weights, same prompts, same run.

    .venv/bin/python benchmarks/rollout.py --threads 1
    .venv/bin/python benchmarks/rollout.py --threads 2 --top-p 0.9
    .venv/bin/python benchmarks/rollout.py --model 5M --prompts 4 --max-new-tokens 32 --repeats 1

Model: random weights of the "rollout" shape by default (dim 128, 4 layers, 4 heads, vocab 4096, context 256),
or a ModelConfig preset (--model tiny / 5M / 25M). Our Transformer is written in the Hugging Face layout with
`save_model` and read back by `LlamaForCausalLM.from_pretrained` (fp32), so both sides hold the same weights.
N prompts of 16..64 random token ids (BOS first), K samples each, temperature 1.0 (--temperature), top_p 1.0
(--top-p), no top-k, max_new_tokens 64. EOS is disabled on both sides (ours: stop_ids=[]; transformers: no
eos_token_id in its generation config), so every sample runs to max_new_tokens: the lengths are checked and
printed.

Runners (each counted as N*K samples and N*K*max_new_tokens generated tokens over wall time, prefill included):
- ours: one `Generator.generate(prompts repeated K times, one SamplingParams per sample with its own seed)` with
  max_batch_size = N*K (every sample decodes in one forward per step; the K copies of a prompt prefill it once
  and share its keys and values); also with max_batch_size from --batch-sizes (default 16,32: continuous
  batching in waves), and without prompt sharing (each copy prefills its prompt), each on its own line.
- transformers batched: the N prompts left-padded into one batch with an attention mask,
  `generate(do_sample=True, num_return_sequences=K, use_cache=True)` under torch.inference_mode.
- transformers per prompt: the same, one prompt at a time (no padding), K return sequences each.
Rounds alternate the runners (one untimed warm-up round first); medians over --repeats rounds are reported, the
headline ratio is ours (max_batch_size N*K) against the faster transformers runner, also as the median of the
rounds' ratios and in process CPU time. Sanity: the distinct samples per prompt (sampling happens), and whether
one prompt's K samples re-generated alone, with the same seeds, equal the batched run's (checked last, after
the figures). --profile: a torch.profiler table of one run of ours and of the faster transformers runner.
This is a script, not a test: timings are not asserted.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from decode import Tok  # a token-ids-only tokenizer stub (benchmarks/ is on sys.path when run as a script)
from llama2.cpu import cpu_banner

ROLLOUT_SHAPE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, multiple_of=32, vocab_size=4096,
                     max_seq_len=256)


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(15, 64))] for _ in range(n)]


def hf_from_ours(model, tmp: str):
    """The same weights as a transformers LlamaForCausalLM (through our HF-layout checkpoint), EOS disabled."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from llama2.checkpoint import save_model

    hf_logging.disable_progress_bar()

    save_model(model, tmp)
    hf = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    gc = hf.generation_config
    gc.eos_token_id = None  # never stops early; every sequence runs to max_new_tokens
    gc.pad_token_id = 0
    gc.max_length = type(gc)().max_length  # the library default: max_new_tokens decides, without a warning
    return hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rollout",
                    help="rollout (default: dim 128, 4 layers, vocab 4096, context 256) or a ModelConfig preset: "
                         "tiny, 5M, 25M")
    ap.add_argument("--prompts", type=int, default=8, help="N prompts (default 8)")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every runner (default 1)")
    ap.add_argument("--batch-sizes", default="16,32",
                    help="extra max_batch_size values for ours, comma-separated ('' for none)")
    ap.add_argument("--profile", action="store_true", help="profile one run of ours and of transformers")
    args = ap.parse_args()

    from llama2.config import ModelConfig
    from llama2.inference.generate import Generator, SamplingParams
    from llama2.model import Transformer

    torch.set_num_threads(args.threads)
    import transformers

    print(f"CPU: {cpu_banner()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    cfg = ModelConfig(**ROLLOUT_SHAPE) if args.model == "rollout" else ModelConfig.from_name(args.model)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    N, K, M = args.prompts, args.k, args.max_new_tokens
    prompts = make_prompts(N, cfg.vocab_size)
    n_samples = N * K
    print(f"model {args.model}: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab "
          f"{cfg.vocab_size}, context {cfg.max_seq_len}, {n_params / 1e6:.2f}M parameters, fp32")
    print(f"{N} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens, K={K} samples each "
          f"({n_samples} samples), temperature {args.temperature}, top_p {args.top_p}, top_k off, "
          f"max_new_tokens {M}, EOS disabled")

    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_from_ours(model, tmp)

    # ours: sample j of prompt i is request i*K + j, seed 1000 + i*K + j
    flat = [p for p in prompts for _ in range(K)]
    seeds = [1000 + i for i in range(n_samples)]
    params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=0, max_new_tokens=M,
                             stop_ids=[], seed=s) for s in seeds]
    cache_len = min(2 * cfg.max_seq_len, max(map(len, prompts)) + M)
    sizes = [n_samples] + sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()} - {n_samples})
    gens = {b: Generator(model, Tok(), max_batch_size=b, cache_len=cache_len) for b in sizes}

    def ours(b):
        def run():
            out = gens[b].generate(flat, params)
            return [c.tokens for c in out]
        return run

    # transformers: left-padded batch of the N prompts, K return sequences each (rows i*K .. i*K+K-1: prompt i)
    T = max(map(len, prompts))
    ids = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    hf_kw = dict(do_sample=True, num_return_sequences=K, max_new_tokens=M, temperature=args.temperature,
                 top_p=args.top_p, top_k=0, pad_token_id=0, eos_token_id=None, use_cache=True)

    def hf_batched():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, **hf_kw)
        return [row.tolist() for row in out[:, T:]]

    def hf_per_prompt():
        rows = []
        with torch.inference_mode():
            for p in prompts:
                x = torch.tensor([p])
                out = hf.generate(x, attention_mask=torch.ones_like(x), **hf_kw)
                rows += [row.tolist() for row in out[:, len(p):]]
        return rows

    head = f"ours (max_batch_size {n_samples})"
    runs = {head: ours(n_samples)}
    runs.update({f"ours (max_batch_size {b})": ours(b) for b in sizes[1:]})
    unshared = Generator(model, Tok(), max_batch_size=n_samples, cache_len=cache_len)
    unshared.engine(n_samples).share_prompts = False  # each of the K copies prefills its prompt itself

    def ours_unshared():
        return [c.tokens for c in unshared.generate(flat, params)]
    runs["ours, prompts not shared"] = ours_unshared
    runs["transformers batched"] = hf_batched
    runs["transformers per prompt"] = hf_per_prompt
    peers = ["transformers batched", "transformers per prompt"]

    print("warm-up round (untimed) ...", flush=True)
    outputs = {k: fn() for k, fn in runs.items()}
    for k, rows in outputs.items():
        lengths = sorted({len(r) for r in rows})
        ok = len(rows) == n_samples and lengths == [M]
        print(f"  {k:28s} {len(rows)} samples, generated lengths {lengths}{'' if ok else '  <-- UNEQUAL'}")
        if not ok:
            raise SystemExit(f"{k}: expected {n_samples} samples of {M} tokens each")

    rates: dict[str, list[float]] = {k: [] for k in runs}
    cpu_rates: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        for k, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates[k].append(n_samples / wall)
            cpu_rates[k].append(n_samples / cpu)
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
              + " samples/s", flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{'runner':28s} {'samples/s':>10s} {'tokens/s':>10s} {'CPU samples/s':>14s}   "
          f"(median of {args.repeats}; all rounds: samples/s)")
    for k, v in med.items():
        print(f"{k:28s} {v:10.1f} {v * M:10.1f} {statistics.median(cpu_rates[k]):14.1f}   "
              + ", ".join(f"{x:.1f}" for x in rates[k]))
    best_peer = max(peers, key=lambda p: med[p])
    per_round = [a / b for a, b in zip(rates[head], rates[best_peer])]
    cpu_round = [a / b for a, b in zip(cpu_rates[head], cpu_rates[best_peer])]
    print(f"ratio (ours / transformers): {med[head] / med[best_peer]:.2f}x samples/s (goal >= 3x)  "
          f"[{head} vs {best_peer}; median of the rounds' ratios {statistics.median(per_round):.2f}x: "
          f"{', '.join(f'{x:.2f}' for x in per_round)}]")
    other = [p for p in peers if p != best_peer][0]
    print(f"  vs {other}: {med[head] / med[other]:.2f}x")
    print(f"in process CPU time: ours {statistics.median(cpu_rates[head]):.1f} samples/s, {best_peer} "
          f"{statistics.median(cpu_rates[best_peer]):.1f} samples/s, {statistics.median(cpu_round):.2f}x median "
          f"of the rounds' ratios ({', '.join(f'{x:.2f}' for x in cpu_round)})")
    ours_keys = [k for k in runs if k.startswith("ours")]
    best_ours = max(ours_keys, key=lambda k: med[k])
    print(f"best of ours: {best_ours} {med[best_ours]:.1f} samples/s, {med[best_ours] / med[best_peer]:.2f}x "
          f"{best_peer}")

    # sanity: sampling happens, and a sample does not depend on what it is batched with
    ours_rows = outputs[head]
    distinct = [len({tuple(r) for r in ours_rows[i * K:(i + 1) * K]}) for i in range(N)]
    hf_distinct = [len({tuple(r) for r in outputs[best_peer][i * K:(i + 1) * K]}) for i in range(N)]
    print(f"distinct samples per prompt (of {K}): ours {distinct}, transformers {hf_distinct}")
    alone = Generator(model, Tok(), max_batch_size=K, cache_len=cache_len)
    again = [c.tokens for c in alone.generate(flat[:K], params[:K])]
    single = Generator(model, Tok(), max_batch_size=1, cache_len=cache_len)
    first = single.generate(flat[:1], params[:1])[0].tokens
    same_k = sum(a == b for a, b in zip(again, ours_rows[:K]))
    same_1 = first == ours_rows[0]
    print(f"determinism: prompt 0's {K} samples re-generated alone (max_batch_size {K}, same seeds): {same_k} of "
          f"{K} identical to the batched run; sample 0 alone (max_batch_size 1): "
          f"{'identical' if same_1 else 'DIFFERENT'}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for k in (head, best_peer):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runs[k]()
            print(f"\nprofile of {k} (one run, {n_samples} samples):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    assert all(d > 1 for d in distinct), f"ours: some prompt's {K} samples are all identical: {distinct}"
    assert same_k == K and same_1, "ours: samples differ between the batched run and the same seeds alone"


if __name__ == "__main__":
    main()
