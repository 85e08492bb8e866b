"""Batch-1 decoding of a 7B-shaped model on a GPU against the memory-bandwidth bound, and against transformers.

    python benchmarks/gpu_decode.py                         # 7B shape, bf16, random weights, 128 new tokens
    python benchmarks/gpu_decode.py --preset 1.1B --tokens 64
    python benchmarks/gpu_decode.py --device cpu --preset tiny --tokens 16   # a smoke run without a GPU

A decode step must read every weight once, so tokens/s x weight bytes is the bandwidth the step achieves; the
ratio to the GPU's HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s, or --hbm-tbs) says how close the engine is to
the bound. transformers' `generate` (bf16, SDPA) on the same weights is the peer, measured in the same run.
Random weights (no download); nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from decode import PROMPT, Tok  # benchmarks/ is on sys.path when run as a script

HBM_TBS = {"H200": 4.8, "H100 SXM": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "A100": 2.0}


def build(preset: str, device: torch.device, dtype: torch.dtype):
    from llama2 import ModelConfig, Transformer

    cfg = ModelConfig.from_name(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    return model.to(dtype).eval()


def hf_peer(model, dtype: torch.dtype):
    """transformers' LlamaForCausalLM over the very same tensors (no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                      max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                      tie_word_embeddings=False, torch_dtype=dtype)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, assign=True, strict=False)
    device = model.lm_head.weight.device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(device)  # buffers are not in the state dict
    return hf.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="7B")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--hbm-tbs", type=float, default=None, help="the device's memory bandwidth in TB/s")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()

    from llama2.dtypes import parse_dtype
    from llama2.inference.generate import Generator, SamplingParams

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    hbm = args.hbm_tbs or next((v for k, v in HBM_TBS.items() if k in name), None)
    print(f"torch {torch.__version__}, device {name}, {args.preset} {args.dtype}, {args.tokens} new tokens")
    model = build(args.preset, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed_bytes = model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    read_bytes = weight_bytes - embed_bytes  # a step reads one embedding row, not the table
    params = SamplingParams(temperature=0.0, max_new_tokens=args.tokens, stop_ids=[])
    prompt = [t % model.config.vocab_size for t in PROMPT]  # smoke runs use presets with small vocabularies

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runners = {}
    variants = [("llama2 eager", False)] + ([] if args.no_compile else [("llama2 compiled", True)])
    for label, compile_ in variants:
        gen = Generator(model, Tok(), max_batch_size=1, cache_len=len(prompt) + args.tokens + 8, compile=compile_)
        runners[label] = lambda gen=gen: gen.generate([prompt], params)[0]
    if not args.no_transformers:
        hf = hf_peer(model, dtype)
        ids = torch.tensor([prompt], device=device)

        def hf_run():
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.tokens,
                            min_new_tokens=args.tokens)
        runners["transformers generate"] = hf_run

    rates: dict[str, list[float]] = {k: [] for k in runners}
    for label, fn in runners.items():
        t0 = time.perf_counter()
        fn()  # warm-up: compilation, cache allocation
        sync()
        print(f"  warm-up {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.repeats):
        for label, fn in runners.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            rates[label].append(args.tokens / (time.perf_counter() - t0))
    peer = statistics.median(rates["transformers generate"]) if "transformers generate" in rates else None
    print(f"\nweights read per token: {read_bytes / 1e9:.2f} GB; HBM bandwidth: "
          f"{f'{hbm:.2f} TB/s' if hbm else 'unknown (pass --hbm-tbs)'}")
    print(f"  {'runner':24s} {'tok/s':>8s} {'GB/s':>8s} {'of HBM':>7s} {'vs transformers':>16s}")
    for label, r in rates.items():
        tps = statistics.median(r)
        gbs = tps * read_bytes / 1e9
        frac = f"{gbs / (hbm * 1e3):6.0%}" if hbm else "      -"
        vs = f"{tps / peer:15.2f}x" if peer else "               -"
        print(f"  {label:24s} {tps:8.1f} {gbs:8.0f} {frac} {vs}")


if __name__ == "__main__":
    main()
