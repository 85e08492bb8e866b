"""Training throughput of llama2's loop against transformers' LlamaForCausalLM + torch.optim.AdamW.

Same shapes, batch, precision and thread count, measured in the same run (interleaved rounds, best round kept,
so a noisy shared machine hurts both alike). Each step is a full optimiser step: forward, backward, gradient
clipping to 1.0 (foreach), AdamW (the implementation our loop picks, fused or foreach, for both). Under
--precision bf16 both keep fp32 master weights and run forward under bf16 autocast. Prints the CPU model and
its vector/matrix flags first, and our model-FLOPs utilisation against a matmul peak measured in the same run.

GEMM floor: the same rounds also time exactly the matrix multiplies of one training step and nothing else: for
every Linear (q, k, v, o, gate, up, down per layer, and the LM head) with M = batch * seq tokens, forward
x @ W^T, backward g @ W and g^T @ x, via torch.mm into preallocated outputs, in the training dtype (bf16 under
--precision bf16, else fp32). `gemm share` = floor time / our step time; `bound` = transformers' step time /
floor time, the ratio that a loop with no cost but these GEMMs would reach. Attention's own score and value
matmuls (bmm / flash attention) are not in the floor, so the bound is generous.

    python benchmarks/train_throughput.py                    # ~1M, ~6M, ~25M parameters, fp32, eager + compiled
    python benchmarks/train_throughput.py --sizes 1M --precision bf16 --no-compile
    python benchmarks/train_throughput.py --precision bf16 --no-compile --threads 1 --clock cpu --profile 30
    python benchmarks/train_throughput.py --device cuda --precision bf16 --sizes 1B --batch 4 --seq 2048
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from llama2.config import PRESETS, ModelConfig
from llama2.cpu import cpu_banner
from llama2.model import Transformer
from llama2.train.config import OptimConfig, TrainRecipe
from llama2.train.loop import Trainer
from llama2.train.metrics import flops_per_token, measure_matmul_tflops
from llama2.stages.pretrain import causal_lm_loss

SHAPES = {
    "1M": {"dim": 128, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "vocab_size": 2048},
    "6M": {"dim": 256, "n_layers": 5, "n_heads": 8, "multiple_of": 64, "vocab_size": 4096},
    "25M": {"dim": 512, "n_layers": 5, "n_heads": 8, "multiple_of": 64, "vocab_size": 8192},
    "1B": PRESETS["1.1B"],  # TinyLlama shape, for a GPU
}
DEFAULT_SIZES = ["1M", "6M", "25M"]


class Repeat:
    """The same in-memory batch every step (data loading is not what is measured)."""

    def __init__(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def next(self) -> list[torch.Tensor]:
        return [self.batch]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(cfg: ModelConfig, batch: torch.Tensor, precision: str, compile: bool,
         device: torch.device) -> tuple[Callable[[], float], Trainer]:
    recipe = TrainRecipe(out_dir=tempfile.mkdtemp(prefix="bench-"), max_steps=10**9, batch_size=batch.shape[0],
                         device=device.type, precision=precision, compile=compile,
                         optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"))
    trainer = Trainer(recipe, lambda: Transformer(cfg), causal_lm_loss, Repeat(batch), quiet=True)
    return (lambda: trainer.train_step(trainer.batches.next())["loss"]), trainer


def profile_step(name: str, step: Callable[[], float], rows: int) -> None:
    """torch.profiler over one step, ops sorted by their own CPU time (what the GEMM floor leaves out)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"--- profile: {name}, one step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


def hf(cfg: ModelConfig, batch: torch.Tensor, precision: str, device: torch.device,
       fused: bool) -> Callable[[], float]:
    """transformers' model under the loop's own precision scheme (fp32 master weights, bf16 autocast for
    --precision bf16), the same AdamW implementation (fused or foreach, as our loop picks) and foreach
    clipping."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                       rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hcfg).to(device).train()
    kind = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, **kind)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> float:
        with amp:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def gemm_floor(cfg: ModelConfig, tokens: int, dtype: torch.dtype, device: torch.device) -> Callable[[], float]:
    """A 'step' of only the Linear layers' GEMMs (see the module docstring): distinct weights per layer as in
    the model, one set of activation / gradient / output buffers per shape."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = [(cfg.dim, q), (cfg.dim, kv), (cfg.dim, kv), (q, cfg.dim),  # (in, out) of q, k, v, o
             (cfg.dim, cfg.hidden_dim), (cfg.dim, cfg.hidden_dim), (cfg.hidden_dim, cfg.dim)]  # gate, up, down
    shapes = layer * cfg.n_layers + [(cfg.dim, cfg.vocab_size)]  # + LM head
    bufs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    for n_in, n_out in set(shapes):
        x, gx = (torch.randn(tokens, n_in, device=device, dtype=dtype) for _ in range(2))
        g, y = (torch.randn(tokens, n_out, device=device, dtype=dtype) for _ in range(2))
        bufs[n_in, n_out] = x, g, y, gx, torch.empty(n_out, n_in, device=device, dtype=dtype)
    plan = [(torch.randn(n_out, n_in, device=device, dtype=dtype), bufs[n_in, n_out]) for n_in, n_out in shapes]

    def step() -> float:
        for w, (x, _, y, _, _) in plan:  # forward: y = x @ W^T
            torch.mm(x, w.t(), out=y)
        for w, (x, g, _, gx, gw) in reversed(plan):  # backward: grad_x = g @ W, grad_W = g^T @ x
            torch.mm(g, w, out=gx)
            torch.mm(g.t(), x, out=gw)
        return 0.0

    return step


def cpu_clock_matmul_tflops(dtype: torch.dtype, size: int, seconds: float) -> float:
    """The matmul peak timed by this process's CPU time (for --clock cpu, so that MFU compares like with like):
    the best of several timed runs of a size x size product."""
    a, b = (torch.randn(size, size).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best, deadline = 0.0, time.process_time() + seconds
    while time.process_time() < deadline:
        t0 = time.process_time()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * size**3 / max(time.process_time() - t0, 1e-9) / 1e12)
    return best


def tokens_per_s(step: Callable[[], float], tokens: int, steps: int, device: torch.device,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    sync(device)
    t0 = clock()
    for _ in range(steps):
        step()
    sync(device)
    return tokens * steps / (clock() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant of our loop")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time steps by this process's CPU time instead of the wall clock: with --threads 1 "
                         "on a machine shared with other jobs, time spent waiting for a core is not counted")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="also print a torch.profiler table (top ROWS ops by self time) of one step of ours "
                         "and of transformers per size")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch finds no CUDA device; run on a GPU machine or use --device cpu",
              file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
        print("error: --clock cpu measures one thread's work: use it with --device cpu --threads 1", file=sys.stderr)
        sys.exit(2)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    device = torch.device(args.device)
    threads = torch.get_num_threads()
    mm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak_sizes = (512, 1024, 2048) if device.type == "cpu" else (4096, 8192)
    if args.clock == "cpu":
        def measure_peak(size: int, seconds: float) -> float:
            return cpu_clock_matmul_tflops(mm_dtype, size, seconds)
    else:
        def measure_peak(size: int, seconds: float) -> float:
            return measure_matmul_tflops(device, mm_dtype, size=size, seconds=seconds)
    peak = max(measure_peak(n, 0.5) for n in peak_sizes)
    where = f"{threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    if device.type == "cpu":
        print(cpu_banner())
    print(f"torch {torch.__version__}, {where}, {args.precision}, batch {args.batch} x {args.seq}, "
          f"{args.clock} clock; "
          f"matmul peak (best of the run) updated per round, at start {peak * 1e3:.0f} GFLOP/s")
    print(f"{'size':>5} {'params':>8} {'transformers':>13} {'ours':>9} {'ratio':>6} {'compiled':>9} {'ratio':>6} "
          f"{'MFU hf':>7} {'MFU ours':>8} {'MFU comp':>8} {'gemm share':>10} {'bound':>6}")
    print("(AdamW: the loop's own choice, fused or foreach, for both; gemm share = fraction of the bound reached)")
    for name in args.sizes:
        cfg = ModelConfig(**{**SHAPES[name], "max_seq_len": args.seq})
        torch.manual_seed(0)
        batch = torch.randint(3, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
        tokens = args.batch * args.seq
        runners = {}
        runners["ours"], trainer = ours(cfg, batch, args.precision, compile=False, device=device)
        fused = bool(trainer.optimizer.defaults.get("fused"))
        runners["hf"] = hf(cfg, batch[:, :args.seq], args.precision, device, fused)
        if not args.no_compile:
            runners["compiled"] = ours(cfg, batch, args.precision, compile=True, device=device)[0]
        runners["floor"] = gemm_floor(cfg, tokens, mm_dtype, device)
        if args.profile:
            for k in ("ours", "hf"):
                profile_step(f"{k} {name} {args.precision}", runners[k], args.profile)
        best = {k: 0.0 for k in runners}
        for k, run in runners.items():  # warm-up (and compilation)
            run()
            run()
        for _ in range(args.rounds):
            for k, run in runners.items():
                best[k] = max(best[k], tokens_per_s(run, tokens, args.steps, device, clock))
            peak = max(peak, measure_peak(peak_sizes[1], 0.3))
        fpt = flops_per_token(cfg, args.seq)
        mfu = {k: fpt * v / (peak * 1e12) for k, v in best.items()}
        comp = (f"{best['compiled']:>9,.0f} {best['compiled'] / best['hf']:>5.2f}x" if "compiled" in best
                else f"{'-':>9} {'-':>6}")
        # step times are tokens / tokens_per_s, so time ratios are inverse throughput ratios
        share, bound = best["ours"] / best["floor"], best["floor"] / best["hf"]
        print(f"{name:>5} {cfg.num_params() / 1e6:>7.2f}M {best['hf']:>13,.0f} {best['ours']:>9,.0f} "
              f"{best['ours'] / best['hf']:>5.2f}x {comp} {mfu['hf']:>7.1%} {mfu['ours']:>8.1%} "
              f"{mfu.get('compiled', float('nan')):>8.1%} {share:>10.0%} {bound:>5.2f}x", flush=True)
        del runners
    print(f"matmul peak used for MFU: {peak * 1e3:.0f} GFLOP/s; gemm share = GEMM floor time / our step time, "
          "bound = transformers step time / GEMM floor time (attention matmuls not in the floor)")


if __name__ == "__main__":
    main()
