"""Speculative decoding speed: a target model alone (llama2's Generator, greedy, batch 1) against
`SpeculativeDecoder(target, draft, k)` with a smaller draft trained by our own pipeline on the same data, or with
prompt lookup (`--draft lookup`: proposals copied from the prompt and the output so far, no draft model),
measured in the same run (interleaved rounds; the median is reported). Greedy outputs must be identical.

    # a draft: the tiny pretraining recipe with a smaller shape, briefly (about a minute on 2 cores)
    llama2 pretrain --config configs/tiny/pretrain.yaml out_dir=/tmp/tiny-draft model.dim=64 model.n_layers=2 \\
        model.n_heads=2 model.n_kv_heads=2 max_steps=300 eval_every=0 save_every=300
    .venv/bin/python benchmarks/speculative.py --target runs/tiny-pretrain/checkpoints/step-000600 \\
        --draft /tmp/tiny-draft/checkpoints/step-000300 --k 2,4 --tokens 64 --threads 1

    # prompt lookup on a chat model answering the built-in world's held-out questions (its answers restate them)
    .venv/bin/python benchmarks/speculative.py --target DEMO/sft/checkpoints/latest --draft lookup --k 2,4 \
        --prompts-file ~/.cache/llama2/world-v5-seed0-p100-t20/prompts.val.jsonl --prompts 48

    # what a check of k + 1 tokens costs on a target whose steps are bound by its weights (random 1.1B weights:
    # their greedy text repeats itself, so the acceptance here says little; the speed per pass is the point)
    .venv/bin/python benchmarks/speculative.py --target 1.1b --draft lookup --k 4 --tokens 32 --prompts 2

Prompts: the first words of a few held-out-like snippets of the tiny corpus (Python docstrings), --prompts of
them; or, with --prompts-file, the first --prompts conversations of a JSONL file of {"messages": [...]} in the chat
format (a final assistant message is dropped), answered until EOS or --tokens. Reported: tokens/s of each runner
(all prompts, new tokens over wall time), the ratio to the target alone, the draft's acceptance rate and tokens per
target pass. This is a script, not a test: it only checks
that the speculative outputs equal the target's own greedy ones.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decode import SHAPES  # benchmarks/ is on sys.path when run as a script
from llama2.cpu import cpu_banner

PROMPTS = [
    "Return a new list containing",
    "The default value of the",
    "def __init__(self,",
    "Raise ValueError if the",
    "This module provides functions for",
    "If the file does not exist,",
    "Convert the given string to",
    "class Queue:\n    \"\"\"",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target checkpoint directory, or a shape of decode.py (tiny, "
                                                    "1.1b: random weights, token-id prompts; with --draft lookup)")
    ap.add_argument("--draft", required=True, help="draft checkpoint directory (same tokenizer), or 'lookup'")
    ap.add_argument("--prompts-file", default=None, help="JSONL of chat conversations to answer instead")
    ap.add_argument("--ngram", default="3:1", help="prompt lookup: longest:shortest n-gram searched (default 3:1)")
    ap.add_argument("--k", default="2,4", help="draft tokens per target pass, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llama2.checkpoint import load_model
    from llama2.inference.generate import Generator, SamplingParams
    from llama2.inference.speculative import SpeculativeDecoder
    from llama2.tokenizer import Tokenizer

    print(f"CPU: {cpu_banner()}; torch {torch.__version__}, {args.threads} threads")
    if args.target in SHAPES:  # random weights of decode.py's shape: what one check costs against one step
        from decode import PROMPT, Tok, hf_model, ours_sharing

        tok, target = Tok(), ours_sharing(hf_model(SHAPES[args.target]))
        PROMPTS[:] = [PROMPT[:-1] + [PROMPT[-1] + i] for i in range(len(PROMPTS))]
    else:
        tok = Tokenizer(args.target)
        target = load_model(args.target, "cpu", torch.float32)
    draft = None if args.draft == "lookup" else load_model(args.draft, "cpu", torch.float32)
    n_t = sum(p.numel() for p in target.parameters())
    if args.prompts_file:
        import json

        from llama2.chat import encode_dialog

        rows = [json.loads(line) for line in open(args.prompts_file, encoding="utf-8") if line.strip()]
        dialogs = [[m for m in r["messages"]][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"]
                   for r in rows[:args.prompts]]
        prompts = [encode_dialog(tok, d) for d in dialogs]
        stops = [tok.eos_id]
    else:
        prompts = [p if isinstance(p, list) else tok.encode(p, bos=True) for p in PROMPTS[:args.prompts]]
        stops = []
    params = SamplingParams(temperature=0.0, max_new_tokens=args.tokens, stop_ids=stops)
    gen = Generator(target, tok, max_batch_size=1)
    want = [gen.generate([p], params)[0].tokens for p in prompts]
    total = sum(len(w) for w in want)

    stats: dict[str, tuple[int, int, int]] = {}

    def alone():
        for p in prompts:
            gen.generate([p], params)

    def speculative(k: int):
        longest, shortest = (int(x) for x in args.ngram.split(":"))
        spec = SpeculativeDecoder(target, draft, k=k, ngram=longest, ngram_min=shortest)

        def run():
            proposed = accepted = calls = 0
            for p, w in zip(prompts, want):
                out = spec.generate(p, params)
                assert out.tokens == w, "speculative greedy output differs from the target's"
                proposed, accepted, calls = proposed + out.proposed, accepted + out.accepted, calls + out.target_calls
            stats[f"speculative k={k}"] = (proposed, accepted, calls)
        return run

    runs = {"target alone": alone, **{f"speculative k={k}": speculative(int(k)) for k in args.k.split(",")}}
    for fn in runs.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for label, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            rates[label].append(total / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    drafting = "prompt lookup" if draft is None else \
        f"draft {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M parameters"
    print(f"target {n_t / 1e6:.2f}M parameters, {drafting}; {len(prompts)} prompts, {total} new greedy tokens in "
          f"all (at most {args.tokens} each); median of {args.repeats}; outputs identical to the target's: yes")
    print(f"  {'runner':18s} {'tok/s':>8s} {'vs alone':>9s} {'accepted':>9s} {'tok/pass':>9s}")
    for label, v in med.items():
        extra = ""
        if label in stats:
            proposed, accepted, calls = stats[label]
            extra = f" {accepted / max(proposed, 1):9.0%} {total / max(calls, 1):9.2f}"
        print(f"  {label:18s} {v:8.1f} {v / med['target alone']:8.2f}x{extra}")


if __name__ == "__main__":
    main()
