"""Serving many LoRA adapters in one batch: 16 greedy requests spread over 4 adapters (4 each), decoded together by
llama2's engine (`Generator(adapters=...)`), against the peers a user would otherwise pick, in the same run:

- PEFT's mixed-adapter batch (`PeftModel.generate(..., adapter_names=[...])`, transformers' generate);
- vLLM's multi-LoRA (CPU build, `LLM(enable_lora=True)` with a `LoRARequest` per prompt; its own virtual environment,
  made by benchmarks/setup_vllm.sh; left out with --no-vllm or when missing);
- without multi-LoRA: each adapter merged into its own copy of the model, its 4 requests decoded together, one
  adapter after another (what one server per adapter gives);
- and, for the cost of the adapters, our engine on the same 16 requests with no adapter.

Random weights of the decode benchmark's shapes (--shape tiny | 1.1b), adapters of rank --rank on --targets, saved
by PEFT. Tokens/s count the generated tokens over wall time (prefill included), median of --repeats interleaved
rounds (vLLM's after the others, alone: with its worker processes alive our rounds ran up to 2x slower in one
run). Greedy tokens are compared between the engines (agreement printed). This is a script, not a test: nothing is
asserted.

    .venv/bin/python benchmarks/multi_lora.py --threads 2
    .venv/bin/python benchmarks/multi_lora.py --shape 1.1b --tokens 16 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import CACHE, ROOT, SHAPES, Tok, VllmWorker, hf_model, ours_sharing  # noqa: E402

from llama2.cpu import cpu_banner  # noqa: E402

PROMPTS = [[1, 450, 4996, 17354, 1701, 29916, 432, 17204][: 4 + i % 5] + [100 + i] for i in range(16)]


def make_adapters(hf, names: list[str], rank: int, targets: list[str], work: Path) -> dict[str, Path]:
    """PEFT adapters with random lora_B (so each changes the output), saved once per shape and setting."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i, name in enumerate(names):
        path = work / name
        out[name] = path
        if (path / "adapter_model.safetensors").exists():
            continue
        torch.manual_seed(100 + i)
        m = get_peft_model(copy.deepcopy(hf), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        m.save_pretrained(path)
    return out


def timed(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, after one warm-up each (kernels built, weights packed, graphs captured), in rounds."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_banner())
    print(f"torch {torch.__version__}, {args.threads} thread(s); shape {args.shape}, {len(PROMPTS)} requests x "
          f"{args.tokens} tokens, {args.adapters} adapters of rank {args.rank} on {args.targets}")

    from peft import PeftModel

    from llama2.inference.generate import Generator, SamplingParams
    from llama2.lora import merge_lora
    from llama2.checkpoint.adapter import load_adapter

    hf = hf_model(SHAPES[args.shape])
    work = CACHE / f"multi-lora-{args.shape}-r{args.rank}-{args.targets.replace(',', '-')}"
    names = [f"a{i}" for i in range(args.adapters)]
    paths = make_adapters(hf, names, args.rank, args.targets.split(","), work)
    chosen = [names[i % len(names)] for i in range(len(PROMPTS))]
    n = args.tokens
    model = ours_sharing(hf)

    gen = Generator(model, Tok(), max_batch_size=len(PROMPTS), cache_len=512, adapters=paths)
    plain = Generator(model, Tok(), max_batch_size=len(PROMPTS), cache_len=512)
    per_adapter = {}
    for name, path in paths.items():  # merged copies (a plain model each), for the one-server-per-adapter way
        merged = merge_lora(load_adapter(copy.deepcopy(model), path))
        per_adapter[name] = Generator(merged, Tok(), max_batch_size=len(PROMPTS), cache_len=512)
    greedy = [SamplingParams(temperature=0.0, max_new_tokens=n, stop_ids=[], adapter=a) for a in chosen]
    results: dict[str, list[list[int]]] = {}

    def ours() -> None:
        results["llama2 multi-LoRA"] = [c.tokens for c in gen.generate(PROMPTS, greedy)]

    def base_only() -> None:
        out = plain.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=n, stop_ids=[]))
        assert all(len(c.tokens) == n for c in out)

    def merged_one_by_one() -> None:
        got: dict[int, list[int]] = {}
        for name, g in per_adapter.items():
            idx = [i for i, a in enumerate(chosen) if a == name]
            outs = g.generate([PROMPTS[i] for i in idx], SamplingParams(temperature=0.0, max_new_tokens=n,
                                                                          stop_ids=[]))
            got.update({i: c.tokens for i, c in zip(idx, outs)})
        results["merged, one adapter at a time"] = [got[i] for i in range(len(PROMPTS))]

    peft = PeftModel.from_pretrained(copy.deepcopy(hf), paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    peft.eval()
    T = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])  # left padding, as generate wants
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])

    def peft_mixed() -> None:
        with torch.inference_mode():
            out = peft.generate(input_ids=ids, attention_mask=mask, adapter_names=chosen, do_sample=False,
                                max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        results["PEFT mixed batch"] = out[:, T:].tolist()

    runs = {"llama2 multi-LoRA": ours, "llama2, no adapters": base_only,
            "merged, one adapter at a time": merged_one_by_one, "PEFT mixed batch": peft_mixed}
    times = timed(runs, args.repeats)
    if not args.no_vllm and args.vllm_python.exists():  # on its own, after ours: it starts processes of its own
        path = work / "base-hf"
        if not (path / "config.json").exists():
            hf.save_pretrained(path, safe_serialization=True)
        print("starting vLLM ...", file=sys.stderr, flush=True)
        extra = tuple(x for name in names for x in ("--lora", f"{name}={paths[name]}")) + (
            "--max-lora-rank", str(max(8, args.rank)))
        vllm = VllmWorker(args.vllm_python, path, len(PROMPTS), args.threads, extra)

        def vllm_run() -> None:
            results["vLLM multi-LoRA"] = vllm.generate(PROMPTS, n, chosen)

        try:
            times.update(timed({"vLLM multi-LoRA": vllm_run}, args.repeats))
        finally:
            vllm.close()
    elif not args.no_vllm:
        print(f"no vLLM peer: {args.vllm_python} is missing (run benchmarks/setup_vllm.sh)")
    total = len(PROMPTS) * n
    rate = {k: total / statistics.median(v) for k, v in times.items()}
    for label, r in rate.items():
        print(f"{label:32s} {r:9.1f} tok/s")
    mine = results["llama2 multi-LoRA"]
    for label, toks in results.items():
        if label != "llama2 multi-LoRA":
            same = sum(a == b for a, b in zip(mine, toks))
            print(f"greedy agreement with {label}: {same}/{len(mine)} requests")
    ours_rate = rate["llama2 multi-LoRA"]
    print(f"cost of the adapters: {ours_rate / rate['llama2, no adapters']:.2f}x the tokens/s without them")
    for peer in ("PEFT mixed batch", "merged, one adapter at a time", "vLLM multi-LoRA"):
        if peer in rate:
            print(f"ratio llama2 multi-LoRA / {peer}: {ours_rate / rate[peer]:.2f}x")


if __name__ == "__main__":
    main()
