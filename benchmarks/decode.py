"""Batch-1 greedy decoding speed: llama2's Generator against transformers' `generate` and llama.cpp on the same
random weights, measured in the same run (interleaved rounds; the median is reported).

    .venv/bin/python benchmarks/decode.py                      # tiny (~5M + embeddings) and 1.1B models
    .venv/bin/python benchmarks/decode.py --models tiny --tiny-tokens 256 --threads 1
    .venv/bin/python benchmarks/decode.py --models 1.1b --profile

Peers: transformers `generate(do_sample=False)` (fp32); llama.cpp (llama-cpp-python, when importable) on the
weights converted to GGUF f32 and q8_0 with llama.cpp's own convert_hf_to_gguf.py (found in the llama-cpp-python
sdist that tests/conftest.py caches). Ours: fp32 (batch-1 steps through the fp32 matrix-vector kernel;
fp32+torch: through PyTorch's F.linear), and weight-only int8 (`Generator(quantize="int8")`).
Throughput counts generated tokens over wall time, prefill of the short prompt included, for every runner.
This is a script, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama2.cpu import cpu_banner

ROOT = Path(__file__).resolve().parents[1]
SDIST = Path(os.environ.get("LLAMA2_TEST_CACHE", Path.home() / ".cache" / "llama2-tests")) / "llama_cpp_python-0.3.36"
LLAMA_CPP = SDIST / "vendor" / "llama.cpp"
CACHE = Path.home() / ".cache" / "llama2" / "bench"

SHAPES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                 intermediate_size=704),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632),
}
PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204]  # "<s> The quick brown fox jumps" in the Llama vocab


def hf_model(shape: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      **shape)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
    return model


def ours_sharing(hf):
    """Our Transformer over the very same tensors (no copy)."""
    from llama2.checkpoint.hf import config_from_hf
    from llama2.model import Transformer

    cfg = config_from_hf(hf.config.to_dict(), Path("<in-memory transformers model>"))
    model = Transformer(cfg, device="meta")
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, assign=True)
    return model.eval()


class Tok:
    """Enough of a tokenizer for timing (the prompt is token ids; text is never read)."""

    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        raise NotImplementedError

    def decode(self, ids):
        return ""


def gguf_files(hf, name: str, kinds: list[str], quiet: bool) -> dict[str, Path]:
    """Convert the HF weights to GGUF with llama.cpp's converter (cached by shape and seed)."""
    from llama2.tokenizer import tokenizer_from_gguf

    out = {}
    todo = [k for k in kinds if not (CACHE / f"{name}-{k}.gguf").exists()]
    if todo:
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            hf.save_pretrained(tmp)
            tokenizer_from_gguf(LLAMA_CPP / "models" / "ggml-vocab-llama-spm.gguf", tmp)
            env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
            for kind in todo:
                target = CACHE / f"{name}-{kind}.gguf"
                log(f"converting {name} to GGUF {kind} with convert_hf_to_gguf.py ...", quiet)
                subprocess.run([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), tmp, "--outfile",
                                str(target) + ".tmp", "--outtype", kind], env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                os.replace(str(target) + ".tmp", target)
    for k in kinds:
        out[k] = CACHE / f"{name}-{k}.gguf"
    return out


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def runners(hf, name: str, n_tokens: int, args) -> dict[str, callable]:
    from llama2.inference.generate import Generator, SamplingParams

    ids = torch.tensor([PROMPT])
    params = SamplingParams(temperature=0.0, max_new_tokens=n_tokens, stop_ids=[])
    out: dict[str, callable] = {}

    def hf_run():
        with torch.inference_mode():
            got = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_tokens,
                              min_new_tokens=n_tokens)
        assert got.shape[1] == len(PROMPT) + n_tokens

    out["transformers fp32"] = hf_run
    model = ours_sharing(hf)
    gens = {}
    for variant in args.ours.split(","):
        kind, *extras = variant.split("+")
        gens[f"llama2 {variant}"] = Generator(model, Tok(), max_batch_size=1, cache_len=512,
                                              quantize=None if kind == "fp32" else kind,
                                              compile="compile" in extras, fast_fp32="torch" not in extras)
    for label, gen in gens.items():
        def run(gen=gen):
            c = gen.generate([PROMPT], params)[0]
            assert len(c.tokens) == n_tokens
        out[label] = run
    if not args.no_llama_cpp:
        try:
            import llama_cpp
        except ImportError:
            log("llama-cpp-python is not importable: llama.cpp peers skipped", args.quiet)
        else:
            for kind, path in gguf_files(hf, name, args.gguf, args.quiet).items():
                llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=64, n_threads=args.threads,
                                      n_threads_batch=args.threads, verbose=False)

                def cpp_run(llm=llm):
                    n = 0
                    for _ in llm.generate(PROMPT, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
                        n += 1
                        if n == n_tokens:
                            break
                    assert n == n_tokens

                out[f"llama.cpp {kind}"] = cpp_run
    return out


def measure(run_fns: dict[str, callable], n_tokens: int, repeats: int, quiet: bool) -> dict[str, list[float]]:
    for label, fn in run_fns.items():  # warm-up (first calls allocate caches, build kernels, page in weights)
        log(f"  warm-up {label}", quiet)
        fn()
    rates: dict[str, list[float]] = {k: [] for k in run_fns}
    for r in range(repeats):
        for label, fn in run_fns.items():
            t0 = time.perf_counter()
            fn()
            rates[label].append(n_tokens / (time.perf_counter() - t0))
            log(f"  round {r + 1}/{repeats} {label}: {rates[label][-1]:.1f} tok/s", quiet)
    return rates


def profile(gen_fn, quiet: bool) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        gen_fn()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,1.1b", help="comma-separated: tiny, 1.1b")
    ap.add_argument("--tiny-tokens", type=int, default=128)
    ap.add_argument("--big-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every runner")
    ap.add_argument("--ours", default="fp32,int8", help="our variants: fp32, int8, each optionally +compile (e.g. int8+compile); fp32+torch: "
                         "fp32 through PyTorch's matmuls instead of the matrix-vector kernel")
    ap.add_argument("--gguf", default="f32,q8_0", type=lambda s: s.split(","), help="llama.cpp weight types")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of our decoding")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_banner()}")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for name in args.models.split(","):
        n_tokens = args.tiny_tokens if name == "tiny" else args.big_tokens
        log(f"building random {name} model ...", args.quiet)
        hf = hf_model(SHAPES[name])
        n_params = sum(p.numel() for p in hf.parameters())
        fns = runners(hf, name, n_tokens, args)
        rates = measure(fns, n_tokens, args.repeats, args.quiet)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"\n{name}: {n_params / 1e6:.1f}M parameters ({n_params * 4 / 1e9:.2f} GB fp32), batch 1 greedy, "
              f"{n_tokens} new tokens after an {len(PROMPT)}-token prompt, median of {args.repeats}")
        peers = [k for k in med if not k.startswith("llama2")]
        print(f"  {'runner':20s} {'tok/s':>8s}  " + "  ".join(f"{'vs ' + p:>22s}" for p in peers))
        for k, v in med.items():
            ratios = "  ".join(f"{v / med[p]:21.2f}x" for p in peers)
            print(f"  {k:20s} {v:8.1f}  {ratios}")
        if args.profile:
            for k, fn in fns.items():
                if k.startswith("llama2"):
                    print(f"\nprofile of {k} ({n_tokens} tokens):")
                    profile(fn, args.quiet)
        del fns, hf
        gc.collect()


if __name__ == "__main__":
    main()
