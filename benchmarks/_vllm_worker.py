"""vLLM's side of the decoding benchmarks, run by vLLM's own Python (its virtual environment; see
benchmarks/setup_vllm.sh): loads a Hugging Face checkpoint into `vllm.LLM` once, then answers requests from
standard input, one JSON line each ({"prompts": [[ids...]...], "max_tokens": N}), with one line
`RESULT {"tokens": [[ids...]...], "seconds": S}` (greedy, EOS ignored, no detokenising). An empty line ends it.
With --lora NAME=PATH (repeatable) vLLM serves those LoRA adapters, and a request may add
"adapters": [NAME or null per prompt].

    python benchmarks/_vllm_worker.py CHECKPOINT_DIR --max-seqs 16 --max-len 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--max-lora-rank", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    adapters = {}
    if args.lora:
        from vllm.lora.request import LoRARequest

        for i, item in enumerate(args.lora, 1):
            name, _, path = item.partition("=")
            adapters[name] = LoRARequest(name, i, path)
    lora = dict(enable_lora=True, max_loras=len(adapters), max_lora_rank=args.max_lora_rank) if adapters else {}
    llm = LLM(model=args.checkpoint, skip_tokenizer_init=True, dtype=args.dtype, max_model_len=args.max_len,
              max_num_seqs=args.max_seqs, seed=0, **lora)
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
        start = time.perf_counter()
        names = req.get("adapters")
        chosen = [adapters[n] if n else None for n in names] if names else None
        out = llm.generate(prompts, params, use_tqdm=False, lora_request=chosen)
        seconds = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in out]
        print("RESULT " + json.dumps({"tokens": tokens, "seconds": seconds}), flush=True)


if __name__ == "__main__":  # vLLM starts processes of its own: everything runs under this guard
    main()
