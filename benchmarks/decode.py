"""Greedy decoding and prefill speed: llama2's Generator against transformers and llama.cpp on the same random
weights, measured in the same run (interleaved rounds; the median is reported), each figure also as a share of
the limit the machine's memory bandwidth (decoding) or matmul speed (prefill) sets, both measured in the run.

    .venv/bin/python benchmarks/decode.py                      # tiny (~5M + embeddings) and 1.1B models
    .venv/bin/python benchmarks/decode.py --models tiny --tiny-tokens 256 --threads 1
    .venv/bin/python benchmarks/decode.py --models 1.1b --sections decode --big-tokens 16 --ours fp32,int8
    .venv/bin/python benchmarks/decode.py --models tiny --sections batch,prefill --batches 4,16
    .venv/bin/python benchmarks/decode.py --models 1.1b --profile

Sections (--sections): `decode`, batch-1 decoding of --tiny-tokens / --big-tokens new tokens after an 8-token
prompt; `batch`, the same with B copies of the prompt decoded together for each B of --batches (ours: B
concurrent requests in one engine; transformers: `generate` on a batch of B; llama.cpp: B sequences in one
`llama_decode` per step through llama-cpp-python's low-level API, as llama.cpp's `batched` example does);
`prefill`, one --prefill-tokens prompt (ours: the engine's chunked prefill, then the first token; transformers:
one forward; llama.cpp: one `llama_decode` of the prompt), tokens/s of prompt.

Peers: transformers (fp32); vLLM on the CPU (fp32, its own virtual environment made by benchmarks/setup_vllm.sh,
`.venv-vllm` or --vllm-python; it runs in a process of its own, benchmarks/_vllm_worker.py, loading the same weights
from a Hugging Face checkpoint, and is sent each round's prompts over a pipe; greedy, EOS ignored, prefix caching
as vLLM sets it); llama.cpp (llama-cpp-python, when importable) on GGUF f32 and q8_0 files written by
our own exporter (`llama2 convert --to gguf`, llama2.checkpoint.gguf.save_gguf; --gguf-source ours, the default),
by llama.cpp's convert_hf_to_gguf.py (--gguf-source llama.cpp; found in the llama-cpp-python sdist that
tests/conftest.py caches) or both. Ours: fp32 (batch-1 steps through the fp32 matrix-vector kernel; fp32+torch:
through PyTorch's F.linear), weight-only int8 (`Generator(quantize="int8")`), each optionally +compile.

The limits: decoding reads every weight once per step (and the KV cache so far), so tokens/s <= B x bandwidth /
bytes per step, with the bandwidth of a large torch sum in this process; prefill is compute-bound: its share is
of 2 x parameters x tokens FLOPs at the speed of a large fp32 matmul in this process. Throughput counts tokens
over wall time, the short prompt's prefill included for decoding. This is a script, not a test: nothing is
asserted.
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


def gguf_files(hf, name: str, kinds: list[str], source: str, quiet: bool) -> dict[str, Path]:
    """GGUF files of the HF weights, keyed by label ("f32", "q8_0"; "f32 (convert_hf)" ... with --gguf-source
    both): written by our exporter (ours) and/or llama.cpp's converter (llama.cpp), cached by shape and seed."""
    out = {}
    if source in ("ours", "both"):
        for kind, path in our_gguf_files(hf, name, kinds, quiet).items():
            out[kind if source == "ours" else f"{kind} (ours)"] = path
    if source in ("llama.cpp", "both"):
        for kind, path in cpp_gguf_files(hf, name, kinds, quiet).items():
            out[kind if source == "llama.cpp" else f"{kind} (convert_hf)"] = path
    return out


def our_gguf_files(hf, name: str, kinds: list[str], quiet: bool) -> dict[str, Path]:
    """The HF weights exported by llama2's own GGUF writer (save_gguf, what `llama2 convert --to gguf` runs)."""
    from llama2.checkpoint.gguf import save_gguf
    from llama2.tokenizer import tokenizer_from_gguf

    todo = [k for k in kinds if not (CACHE / f"{name}-{k}.ours.gguf").exists()]
    if todo:
        CACHE.mkdir(parents=True, exist_ok=True)
        model = ours_sharing(hf)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tok = tokenizer_from_gguf(LLAMA_CPP / "models" / "ggml-vocab-llama-spm.gguf", tmp)
            for kind in todo:
                log(f"exporting {name} to GGUF {kind} with llama2's save_gguf ...", quiet)
                save_gguf(model, CACHE / f"{name}-{kind}.ours.gguf", tok, kind)
    return {k: CACHE / f"{name}-{k}.ours.gguf" for k in kinds}


def cpp_gguf_files(hf, name: str, kinds: list[str], quiet: bool) -> dict[str, Path]:
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


class VllmWorker:
    """vLLM's LLM in its own Python, over a pipe (benchmarks/_vllm_worker.py): generate(prompts, n) -> token lists."""

    def __init__(self, python: Path, checkpoint: Path, max_seqs: int, threads: int,
                 extra: tuple[str, ...] = ()) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_LOGGING_LEVEL": "WARNING"}
        self.proc = subprocess.Popen([str(python), str(ROOT / "benchmarks" / "_vllm_worker.py"), str(checkpoint),
                                      "--max-seqs", str(max_seqs), "--max-len", "512", "--threads", str(threads),
                                      *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)  # its own process group: vLLM's children go with it
        self._read("READY")

    def _read(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        raise RuntimeError(f"the vLLM worker ended before {tag} (exit code {self.proc.wait()})")

    def generate(self, prompts: list[list[int]], max_tokens: int, adapters: list[str | None] | None = None
                 ) -> list[list[int]]:
        import json

        req = {"prompts": prompts, "max_tokens": max_tokens, "adapters": adapters}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT"))["tokens"]

    def close(self) -> None:
        """End the worker and every process vLLM started (its engine core and workers keep GBs otherwise)."""
        import signal

        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_VLLM: dict[str, VllmWorker] = {}


def vllm_worker(hf, name: str, args) -> VllmWorker | None:
    """The vLLM worker for this model (started once, on a Hugging Face copy of its weights), or None without vLLM."""
    if args.no_vllm:
        return None
    if not args.vllm_python.exists():
        log(f"no vLLM peer: {args.vllm_python} is missing (run benchmarks/setup_vllm.sh, or give --vllm-python)")
        args.no_vllm = True
        return None
    if name not in _VLLM:
        path = CACHE / f"{name}-hf"
        if not (path / "config.json").exists():
            hf.save_pretrained(path, safe_serialization=True)
        log(f"starting vLLM on {path} ...", args.quiet)
        _VLLM[name] = VllmWorker(args.vllm_python, path, max(int(b) for b in args.batches.split(",")), args.threads)
    return _VLLM[name]


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
    vllm = vllm_worker(hf, name, args)
    if vllm is not None:
        def vllm_run():
            got = vllm.generate([PROMPT], n_tokens)
            assert len(got[0]) == n_tokens
        out["vllm fp32"] = vllm_run
    for kind, path in llama_cpp_files(hf, name, args).items():
        import llama_cpp

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


class CppBatched:
    """llama.cpp decoding B sequences together through llama-cpp-python's low-level API: one context with
    n_seq_max = B, every step one llama_decode of B tokens (one per sequence), greedy by argmax of each
    sequence's logits; a prompt is decoded in one llama_decode per sequence group (what `prefill` times)."""

    def __init__(self, path: Path, batch: int, n_ctx: int, threads: int, n_batch: int) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, min(n_batch, 512)
        cp.n_seq_max, cp.n_threads, cp.n_threads_batch = batch, threads, threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.capacity = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, batch)
        self.B = batch

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits), in one llama_decode."""
        b = self.batch
        for i, (t, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        import numpy as np

        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def run(self, prompt: list[int], n_tokens: int) -> list[list[int]]:
        """Greedy: n_tokens new tokens for each of B copies of prompt."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        T = len(prompt)
        items = [(t, i, s, i == T - 1) for s in range(self.B) for i, t in enumerate(prompt)]
        per = max(1, self.capacity // T)  # whole prompts per llama_decode
        last: list[int] = []
        for lo in range(0, self.B, per):
            chunk = [it for it in items if lo <= it[2] < lo + per]
            self._decode(chunk)
            last += [self._argmax(j) for j, it in enumerate(chunk) if it[3]]
        out = [[t] for t in last]
        for step in range(1, n_tokens):
            self._decode([(out[s][-1], T + step - 1, s, True) for s in range(self.B)])
            for s in range(self.B):
                out[s].append(self._argmax(s))
        return out

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def batch_runners(hf, name: str, batch: int, n_tokens: int, args) -> dict[str, callable]:
    """Greedy decoding of `batch` copies of PROMPT, n_tokens each, by every runner."""
    from llama2.inference.generate import Generator, SamplingParams

    ids = torch.tensor([PROMPT] * batch)
    params = SamplingParams(temperature=0.0, max_new_tokens=n_tokens, stop_ids=[])
    out: dict[str, callable] = {}

    def hf_run():
        with torch.inference_mode():
            got = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_tokens,
                              min_new_tokens=n_tokens)
        assert got.shape == (batch, len(PROMPT) + n_tokens)

    out["transformers fp32"] = hf_run
    model = ours_sharing(hf)
    for variant in args.ours.split(","):
        kind, *extras = variant.split("+")
        gen = Generator(model, Tok(), max_batch_size=batch, cache_len=512, quantize=None if kind == "fp32" else kind,
                        compile="compile" in extras, fast_fp32="torch" not in extras)

        def run(gen=gen):
            got = gen.generate([PROMPT] * batch, params)
            assert all(len(c.tokens) == n_tokens for c in got)
        out[f"llama2 {variant}"] = run
    vllm = vllm_worker(hf, name, args)
    if vllm is not None:
        def vllm_run():
            got = vllm.generate([PROMPT] * batch, n_tokens)
            assert len(got) == batch and all(len(t) == n_tokens for t in got)
        out["vllm fp32"] = vllm_run
    for label, path in llama_cpp_files(hf, name, args).items():
        per_seq = -(-(len(PROMPT) + n_tokens + 8) // 256) * 256  # llama.cpp splits n_ctx evenly over sequences
        cpp = CppBatched(path, batch, n_ctx=batch * per_seq, threads=args.threads,
                         n_batch=max(512, batch * len(PROMPT)))

        def cpp_run(cpp=cpp):
            got = cpp.run(PROMPT, n_tokens)
            assert len(got) == batch and all(len(t) == n_tokens for t in got)
        out[f"llama.cpp {label}"] = cpp_run
    return out


def prefill_prompt(n: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return PROMPT + torch.randint(3, 32000, (n - len(PROMPT),), generator=g).tolist()


def prefill_runners(hf, name: str, n_prompt: int, args) -> dict[str, callable]:
    """One n_prompt-token prompt through each runner's prefill (and, for ours and llama.cpp, the first token)."""
    from llama2.inference.generate import Generator, SamplingParams

    prompt = prefill_prompt(n_prompt)
    ids = torch.tensor([prompt])
    params = SamplingParams(temperature=0.0, max_new_tokens=1, stop_ids=[])
    out: dict[str, callable] = {}

    def hf_run():
        with torch.inference_mode():
            hf(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)

    out["transformers fp32"] = hf_run
    model = ours_sharing(hf)
    for variant in args.ours.split(","):
        kind, *extras = variant.split("+")
        if "compile" in extras:
            continue  # compilation is of decode steps only: the prefill is the same as without it
        gen = Generator(model, Tok(), max_batch_size=1, cache_len=n_prompt + 8,
                        quantize=None if kind == "fp32" else kind, fast_fp32="torch" not in extras,
                        prefill_chunk=args.prefill_chunk)

        def run(gen=gen):
            assert len(gen.generate([prompt], params)[0].tokens) == 1
        out[f"llama2 {variant}"] = run
    for label, path in llama_cpp_files(hf, name, args).items():
        cpp = CppBatched(path, 1, n_ctx=n_prompt + 64, threads=args.threads, n_batch=n_prompt)

        def cpp_run(cpp=cpp):
            cpp.run(prompt, 1)
        out[f"llama.cpp {label}"] = cpp_run
    return out


def llama_cpp_files(hf, name: str, args) -> dict[str, Path]:
    if args.no_llama_cpp:
        return {}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        log("llama-cpp-python is not importable: llama.cpp peers skipped", args.quiet)
        return {}
    return gguf_files(hf, name, args.gguf, args.gguf_source, args.quiet)


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


# ------------------------------------------------------------------------------------------------ the limits


def read_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of memory reads: the best of a few sums of a fp32 tensor much larger than the caches."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def matmul_flops(repeats: int = 3) -> float:
    """FLOP/s of a large fp32 matmul (the shape of a prefill chunk times a 2048-wide weight)."""
    a, b = torch.randn(512, 2048), torch.randn(2048, 2048)
    a @ b.T
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2 * 512 * 2048 * 2048 / best


def step_bytes(hf, label: str, context: int) -> float:
    """Bytes one decode step reads: every linear weight (fp32: 4 bytes; int8 / q8_0: 34 bytes per 32, the
    block's fp16 scale included; f16: 2), one embedding row, and the fp32 KV cache of `context` positions (fp32
    for ours, f16 for llama.cpp's default cache)."""
    c = hf.config
    linear = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    per = 34 / 32 if ("int8" in label or "q8_0" in label) else 2 if ("f16" in label) else 4
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * context
    kv_bytes = kv * (2 if label.startswith("llama.cpp") else 4)
    return linear * per + c.hidden_size * 4 + kv_bytes


def prefill_flops(hf, n_prompt: int) -> float:
    """FLOPs per prompt token of a prefill that computes the LM head for the last position only: 2 x the
    blocks' linear weights, plus attention's two products over n_prompt / 2 keys on average."""
    c = hf.config
    blocks = sum(m.weight.numel() for n, m in hf.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith("model.layers"))
    return 2 * blocks + 4 * c.num_hidden_layers * c.hidden_size * n_prompt / 2


def table(title: str, med: dict[str, float], share: callable, share_name: str) -> None:
    print(f"\n{title}")
    peers = [k for k in med if not k.startswith("llama2")]
    print(f"  {'runner':28s} {'tok/s':>8s} {share_name:>10s}  " + "  ".join(f"{'vs ' + p:>22s}" for p in peers))
    for k, v in med.items():
        ratios = "  ".join(f"{v / med[p]:21.2f}x" for p in peers)
        print(f"  {k:28s} {v:8.1f} {share(k, v):9.0%}  {ratios}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,1.1b", help="comma-separated: tiny, 1.1b")
    ap.add_argument("--sections", default="decode,batch,prefill", help="comma-separated: decode, batch, prefill")
    ap.add_argument("--tiny-tokens", type=int, default=128)
    ap.add_argument("--big-tokens", type=int, default=32)
    ap.add_argument("--batches", default="4,16", help="batch sizes of the batch section")
    ap.add_argument("--prefill-tokens", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=None, help="our engine's prefill chunk (default 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every runner")
    ap.add_argument("--ours", default="fp32,int8", help="our variants: fp32, int8, each optionally +compile (e.g. int8+compile); fp32+torch: "
                         "fp32 through PyTorch's matmuls instead of the matrix-vector kernel")
    ap.add_argument("--gguf", default="f32,q8_0", type=lambda s: s.split(","), help="llama.cpp weight types")
    ap.add_argument("--gguf-source", default="ours", choices=["ours", "llama.cpp", "both"],
                    help="who writes llama.cpp's GGUF files: llama2's exporter (default), convert_hf_to_gguf.py, or both")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python",
                    help="vLLM's Python (default .venv-vllm, made by benchmarks/setup_vllm.sh)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of our decoding")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    print(f"CPU: {cpu_banner()}")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    bandwidth, flops = read_bandwidth(), matmul_flops()
    print(f"measured here: memory read bandwidth {bandwidth / 1e9:.1f} GB/s (sum of 1 GiB fp32), "
          f"fp32 matmul {flops / 1e9:.1f} GFLOP/s (512x2048 @ 2048x2048)")
    for name in args.models.split(","):
        n_tokens = args.tiny_tokens if name == "tiny" else args.big_tokens
        log(f"building random {name} model ...", args.quiet)
        hf = hf_model(SHAPES[name])
        n_params = sum(p.numel() for p in hf.parameters())
        head = f"{name}: {n_params / 1e6:.1f}M parameters ({n_params * 4 / 1e9:.2f} GB fp32)"

        def bw_share(batch: int, hf=hf):  # hf bound now: the loop deletes its name later
            ctx = len(PROMPT) + n_tokens // 2
            return lambda k, v: v / (batch * bandwidth / step_bytes(hf, k, ctx))

        if "decode" in sections:
            fns = runners(hf, name, n_tokens, args)
            med = {k: statistics.median(v) for k, v in measure(fns, n_tokens, args.repeats, args.quiet).items()}
            table(f"{head}, batch 1 greedy, {n_tokens} new tokens after an {len(PROMPT)}-token prompt, median of "
                  f"{args.repeats}; share: of the bandwidth limit", med, bw_share(1), "of limit")
            if args.profile:
                for k, fn in fns.items():
                    if k.startswith("llama2"):
                        print(f"\nprofile of {k} ({n_tokens} tokens):")
                        profile(fn, args.quiet)
            del fns
            gc.collect()
        if "batch" in sections:
            for batch in [int(b) for b in args.batches.split(",")]:
                fns = batch_runners(hf, name, batch, n_tokens, args)
                rates = measure(fns, batch * n_tokens, args.repeats, args.quiet)
                med = {k: statistics.median(v) for k, v in rates.items()}
                table(f"{head}, batch {batch} greedy ({batch} x {n_tokens} new tokens), tokens/s of all rows, "
                      f"median of {args.repeats}; share: of the bandwidth limit", med, bw_share(batch), "of limit")
                del fns
                gc.collect()
        if "prefill" in sections:
            fns = prefill_runners(hf, name, args.prefill_tokens, args)
            rates = measure(fns, args.prefill_tokens, args.repeats, args.quiet)
            med = {k: statistics.median(v) for k, v in rates.items()}
            table(f"{head}, prefill of a {args.prefill_tokens}-token prompt, prompt tokens/s, median of "
                  f"{args.repeats}; share: of the fp32 matmul limit (block weights and attention FLOPs)", med,
                  lambda k, v, hf=hf: v * prefill_flops(hf, args.prefill_tokens) / flops, "of matmul")
            del fns
            gc.collect()
        worker = _VLLM.pop(name, None)
        if worker is not None:
            agreement(hf, worker, n_tokens)
            worker.close()
        del hf
        gc.collect()


def agreement(hf, worker: VllmWorker, n_tokens: int) -> None:
    """How many of vLLM's greedy tokens equal ours on the batch-1 prompt (random weights: near-ties may differ)."""
    from llama2.inference.generate import Generator, SamplingParams

    ours = Generator(ours_sharing(hf), Tok(), max_batch_size=1, cache_len=512).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_new_tokens=n_tokens, stop_ids=[]))[0].tokens
    theirs = worker.generate([PROMPT], n_tokens)[0]
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    print(f"greedy tokens equal to vLLM's: the first {same} of {n_tokens}")


if __name__ == "__main__":
    main()
