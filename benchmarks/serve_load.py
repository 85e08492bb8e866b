"""Load and soak test of `llama2 serve` over loopback: concurrent streaming clients against one-at-a-time serving.

    .venv/bin/python benchmarks/serve_load.py                         # 16 clients, 60 s soak
    .venv/bin/python benchmarks/serve_load.py --clients 8 --soak-seconds 10 --requests 32
    .venv/bin/python benchmarks/serve_load.py --checkpoint DIR        # a real checkpoint instead of the tiny one

The server runs as a subprocess (`python -m llama2 serve DIR --port 0 --max-batch CLIENTS`, 127.0.0.1 only) on a
tiny random-weight checkpoint written to a temporary directory (a 1000-piece SentencePiece tokenizer trained on
Python's pydoc topics, and a 4-layer dim-256 model) unless --checkpoint is given. The clients are asyncio tasks
in this process, streaming /v1/chat/completions over httpx and parsing the server-sent events themselves.

1. Throughput: the same --requests requests (seeded sampling, --max-tokens each) sent one at a time by a single
   client, then by --clients concurrent clients; generated tokens over wall time for both, and their ratio
   (goal >= 6x at 16 clients). Time to first token (request sent -> first content chunk) and inter-token latency
   (gap between content chunks) of the concurrent run: p50 and p99. Errors: non-200 answers or broken streams.
2. Soak: --clients clients loop for --soak-seconds; each request disconnects after a random number of chunks
   with probability --disconnect. At the end: slots still busy once the clients stopped (leaked; goal 0), the
   server's RSS growth from the end of a warm-up to the end of the soak (goal < 5%), and 5xx answers (goal 0).
3. With --vllm (vLLM's Python, default .venv-vllm made by benchmarks/setup_vllm.sh): after our server, vLLM's
   OpenAI server (`python -m vllm.entrypoints.openai.api_server`, fp32, the same checkpoint, chat template and
   requests, --clients sequences, the same threads) gets the same throughput run; the ratio of the concurrent
   runs' tokens/s, ours over vLLM's (goal >= 1.0x), with both TTFT and ITL percentiles.
This is a script, not a test: nothing is asserted, the goals are printed beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llama2.cpu import cpu_banner

WORDS = ("the", "value", "object", "class", "method", "list", "return", "function", "name", "string", "number",
         "module", "file", "error", "type", "loop", "key", "data")


def tiny_checkpoint(directory: Path, *, dim: int, layers: int) -> Path:
    """A random-weight checkpoint with a freshly trained 1000-piece tokenizer (the tests' recipe)."""
    import sentencepiece as spm
    import torch
    from pydoc_data.topics import topics

    from llama2.checkpoint import save_model
    from llama2.config import ModelConfig
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(topics[k] for k in sorted(topics))[:400_000])
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=1000,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=8, n_kv_heads=8, multiple_of=64, vocab_size=1000,
                      max_seq_len=512)
    out = directory / "tiny-serve"
    save_model(Transformer(cfg).eval(), out, Tokenizer(directory / "tokenizer.model"))
    return out


def start_server(ckpt: Path, slots: int, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "llama2", "serve", str(ckpt), "--port", "0", "--host", "127.0.0.1",
           "--max-batch", str(slots), "--max-queue", str(4 * slots), "--device", "cpu", "--log-level", "warning",
           "--model-name", "bench"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stderr.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    if not m:
        p.kill()
        raise SystemExit(f"the server did not start: {line}{p.stderr.read()}")
    return p, wait_healthy(p, m.group(1), 120, "the server did not become healthy")


def wait_healthy(p: subprocess.Popen, url: str, seconds: float, failure: str) -> str:
    """url once its /health answers 200; the process killed and SystemExit(failure + its stderr) otherwise."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or p.poll() is not None:
            p.kill()
            raise SystemExit(f"{failure}: {p.stderr.read()[-3000:]}")
        time.sleep(0.2)


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:  # Linux fallback
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024


@dataclass
class Result:
    status: int = 0
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str | None = None
    left: bool = False  # the client disconnected before the answer ended


def body(i: int, max_tokens: int, rng: random.Random) -> dict:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 24)))
    return {"model": "bench", "messages": [{"role": "user", "content": f"Explain {words}."}], "stream": True,
            "max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0, "seed": 1000 + i,
            "stream_options": {"include_usage": True}}


async def stream_one(client: httpx.AsyncClient, url: str, payload: dict, stop_after: int | None = None) -> Result:
    """One streaming request; stop_after: disconnect after that many content chunks."""
    r = Result()
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=payload) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                r.error = f"HTTP {resp.status_code}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    r.error = obj["error"]["message"]
                    return r
                if obj.get("usage"):
                    r.tokens = obj["usage"]["completion_tokens"]
                if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - t0
                    else:
                        r.gaps.append(now - last)
                    last = now
                    chunks += 1
                    if stop_after is not None and chunks >= stop_after and not obj["choices"][0]["finish_reason"]:
                        r.left = True
                        return r  # leaving the block closes the connection: a disconnect
    except (httpx.HTTPError, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def start_vllm(python: Path, ckpt: Path, slots: int, threads: int) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server on the same checkpoint, loopback, a free port; waits until /health answers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--served-model-name",
           "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-num-seqs", str(slots),
           "--max-model-len", "512", "--seed", "0"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)  # its own process group: stop() ends vLLM's children too
    return p, wait_healthy(p, f"http://127.0.0.1:{port}", 600, "vLLM's server did not start")


async def throughput(url: str, n: int, clients: int, max_tokens: int, alone_too: bool = True) -> float:
    """The throughput run (one at a time, unless alone_too is False, then concurrently); returns the concurrent
    run's tokens/s."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        rng = random.Random(0)
        payloads = [body(i, max_tokens, rng) for i in range(n)]
        await stream_one(client, url, payloads[0])  # warm-up

        t0 = time.perf_counter()
        alone = [await stream_one(client, url, p) for p in payloads] if alone_too else []
        t_alone = time.perf_counter() - t0

        queue: asyncio.Queue = asyncio.Queue()
        for p in payloads:
            queue.put_nowait(p)
        together: list[Result] = []

        async def worker() -> None:
            while not queue.empty():
                together.append(await stream_one(client, url, queue.get_nowait()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        t_together = time.perf_counter() - t0

    def report(name: str, res: list[Result], secs: float) -> float:
        toks = sum(r.tokens for r in res)
        errors = sum(r.error is not None for r in res)
        rate = toks / secs
        ttft = [r.ttft for r in res if r.ttft is not None]
        gaps = [g for r in res for g in r.gaps]
        print(f"{name:24s} {len(res):4d} requests {toks:6d} tokens in {secs:6.2f} s = {rate:8.1f} tok/s; "
              f"TTFT p50 {pct(ttft, 50) * 1e3:7.1f} ms p99 {pct(ttft, 99) * 1e3:7.1f} ms; "
              f"ITL p50 {pct(gaps, 50) * 1e3:6.2f} ms p99 {pct(gaps, 99) * 1e3:6.2f} ms; errors {errors}")
        return rate

    print(f"\n-- throughput: {n} streaming chat requests of {max_tokens} tokens (seeded sampling)")
    rn = report(f"{clients} concurrent clients", together, t_together)
    if alone_too:
        r1 = report("one at a time", alone, t_alone)
        print(f"ratio concurrent / one at a time: {rn / r1:.2f}x (goal >= 6x at 16 clients)")
    return rn


async def soak(url: str, pid: int, clients: int, seconds: float, disconnect: float, max_tokens: int) -> None:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    statuses: dict[int, int] = {}
    counts = {"requests": 0, "disconnected": 0, "broken": 0, "tokens": 0}
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        rng = random.Random(1)
        # warm-up: a few rounds of the same mix, so allocator pools and caches settle before the baseline
        end = time.monotonic() + min(10.0, max(2.0, seconds / 6))

        async def loop(k: int, until: float, count: bool) -> None:
            i = 0
            while time.monotonic() < until:
                i += 1
                stop = rng.randrange(1, max_tokens) if rng.random() < disconnect else None
                res = await stream_one(client, url, body(k * 100000 + i, rng.randrange(8, max_tokens + 1), rng),
                                       stop)
                if not count:
                    continue
                counts["requests"] += 1
                counts["tokens"] += res.tokens
                statuses[res.status] = statuses.get(res.status, 0) + 1
                if res.left:
                    counts["disconnected"] += 1
                elif res.error is not None:
                    counts["broken"] += 1

        await asyncio.gather(*(loop(k, end, False) for k in range(clients)))
        await asyncio.sleep(0.5)
        rss0 = rss_bytes(pid)
        t0 = time.monotonic()
        await asyncio.gather(*(loop(k, t0 + seconds, True) for k in range(clients)))
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.5)
        health = (await client.get(url + "/health")).json()
        deadline = time.monotonic() + 5
        while (health["busy_slots"] or health["queue_depth"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            health = (await client.get(url + "/health")).json()
        rss1 = rss_bytes(pid)
        metrics = (await client.get(url + "/metrics")).text
    cancelled = re.search(r"^llama2_requests_cancelled_total (\d+)", metrics, re.M)
    five = sum(v for k, v in statuses.items() if k >= 500)
    growth = (rss1 - rss0) / rss0 * 100
    print(f"\n-- soak: {clients} clients for {elapsed:.0f} s, disconnecting at random (p={disconnect})")
    n_cancelled = cancelled.group(1) if cancelled else "?"
    print(f"requests {counts['requests']} ({counts['disconnected']} disconnected mid-answer; the server counted "
          f"{n_cancelled} cancellations, warm-up included), {counts['tokens']} tokens streamed to completion; "
          f"statuses {dict(sorted(statuses.items()))}; broken streams {counts['broken']}")
    print(f"leaked slots {health['busy_slots']} (queue {health['queue_depth']}; goal 0); 5xx {five} (goal 0); "
          f"server RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB ({growth:+.2f}%; goal < 5%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="serve this checkpoint (default: a tiny one)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients and server slots (default 16)")
    ap.add_argument("--requests", type=int, default=48, help="requests in each throughput run (default 48)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per throughput request (default 64)")
    ap.add_argument("--soak-seconds", type=float, default=60.0, help="soak duration (default 60; 0 skips it)")
    ap.add_argument("--disconnect", type=float, default=0.3, help="soak: share of requests that disconnect early")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    ap.add_argument("--dim", type=int, default=256, help="tiny model width (default 256)")
    ap.add_argument("--layers", type=int, default=4, help="tiny model layers (default 4)")
    ap.add_argument("--vllm", action="store_true", help="also run the throughput against vLLM's OpenAI server")
    ap.add_argument("--vllm-python", type=Path, default=Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin"
                    / "python", help="vLLM's Python (default .venv-vllm, made by benchmarks/setup_vllm.sh)")
    args = ap.parse_args()

    print(f"CPU: {cpu_banner()}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or tiny_checkpoint(Path(tmp), dim=args.dim, layers=args.layers)
        what = str(args.checkpoint) if args.checkpoint else (f"tiny random model (dim {args.dim}, {args.layers} "
                                                             "layers, vocab 1000)")
        proc, url = start_server(ckpt, args.clients, args.threads)
        print(f"server: {what}; {url}, {args.clients} slots, {args.threads} torch thread(s), pid {proc.pid}")
        try:
            ours = asyncio.run(throughput(url, args.requests, args.clients, args.max_tokens))
            if args.soak_seconds > 0:
                asyncio.run(soak(url, proc.pid, args.clients, args.soak_seconds, args.disconnect,
                                 args.max_tokens))
        finally:
            stop(proc)
        if args.vllm:
            if not args.vllm_python.exists():
                raise SystemExit(f"{args.vllm_python} is missing: run benchmarks/setup_vllm.sh or give --vllm-python")
            proc, url = start_vllm(args.vllm_python, ckpt, args.clients, args.threads)
            print(f"\nvLLM's OpenAI server on the same checkpoint: {url}, {args.clients} sequences, fp32, "
                  f"{args.threads} thread(s)")
            try:
                theirs = asyncio.run(throughput(url, args.requests, args.clients, args.max_tokens, alone_too=False))
            finally:
                stop(proc, group=True)
            print(f"ratio ours / vLLM at {args.clients} concurrent clients: {ours / theirs:.2f}x tokens/s "
                  "(goal >= 1.0x)")


def stop(proc: subprocess.Popen, group: bool = False) -> None:
    """End a server; group: also every process of the group it leads (vLLM's engine core and workers)."""
    import signal

    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    main()
