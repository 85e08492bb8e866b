"""Training throughput of llama2's loop against transformers' LlamaForCausalLM + torch.optim.AdamW.

Same shapes, batch, dtype and thread count, measured in the same run (interleaved rounds, best round kept, so a
noisy shared machine hurts both alike). Each step is a full optimiser step: forward, backward, gradient clipping
to 1.0, AdamW. Also prints our model-FLOPs utilisation against a matmul peak measured in the same run.

    python benchmarks/train_throughput.py                    # ~1M, ~6M, ~25M parameters, fp32, eager + compiled
    python benchmarks/train_throughput.py --sizes 1M --precision bf16 --no-compile
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch

from llama2.config import ModelConfig
from llama2.model import Transformer
from llama2.train.config import OptimConfig, TrainRecipe
from llama2.train.loop import Trainer
from llama2.train.metrics import flops_per_token, measure_matmul_tflops
from llama2.train.pretrain import causal_lm_loss

SHAPES = {
    "1M": dict(dim=128, n_layers=2, n_heads=4, multiple_of=32, vocab_size=2048),
    "6M": dict(dim=256, n_layers=5, n_heads=8, multiple_of=64, vocab_size=4096),
    "25M": dict(dim=512, n_layers=5, n_heads=8, multiple_of=64, vocab_size=8192),
}


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


def ours(cfg: ModelConfig, batch: torch.Tensor, precision: str, compile: bool) -> Callable[[], float]:
    recipe = TrainRecipe(out_dir=tempfile.mkdtemp(prefix="bench-"), max_steps=10**9, batch_size=batch.shape[0],
                         device="cpu", precision=precision, compile=compile,
                         optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"))
    trainer = Trainer(recipe, lambda: Transformer(cfg), causal_lm_loss, Repeat(batch), quiet=True)
    return lambda: trainer.train_step(trainer.batches.next())["loss"]


def hf(cfg: ModelConfig, batch: torch.Tensor, precision: str) -> Callable[[], float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                       rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hcfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> float:
        with amp:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def tokens_per_s(step: Callable[[], float], tokens: int, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return tokens * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant of our loop")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    threads = torch.get_num_threads()
    mm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    cpu = torch.device("cpu")
    peak = max(measure_matmul_tflops(cpu, mm_dtype, size=n, seconds=0.5) for n in (512, 1024, 2048))
    print(f"torch {torch.__version__}, {threads} threads, {args.precision}, batch {args.batch} x {args.seq}; "
          f"matmul peak (best of the run) updated per round, at start {peak * 1e3:.0f} GFLOP/s")
    print(f"{'size':>5} {'params':>8} {'transformers':>13} {'ours':>9} {'ratio':>6} {'compiled':>9} {'ratio':>6} "
          f"{'MFU hf':>7} {'MFU ours':>8} {'MFU comp':>8}")
    for name in args.sizes:
        cfg = ModelConfig(**SHAPES[name], max_seq_len=args.seq)
        torch.manual_seed(0)
        batch = torch.randint(3, cfg.vocab_size, (args.batch, args.seq + 1))
        tokens = args.batch * args.seq
        runners = {"hf": hf(cfg, batch[:, :args.seq], args.precision),
                   "ours": ours(cfg, batch, args.precision, compile=False)}
        if not args.no_compile:
            runners["compiled"] = ours(cfg, batch, args.precision, compile=True)
        best = {k: 0.0 for k in runners}
        for k, run in runners.items():  # warm-up (and compilation)
            run()
            run()
        for _ in range(args.rounds):
            for k, run in runners.items():
                best[k] = max(best[k], tokens_per_s(run, tokens, args.steps))
            peak = max(peak, measure_matmul_tflops(cpu, mm_dtype, size=1024, seconds=0.3))
        fpt = flops_per_token(cfg, args.seq)
        mfu = {k: fpt * v / (peak * 1e12) for k, v in best.items()}
        comp = (f"{best['compiled']:>9,.0f} {best['compiled'] / best['hf']:>5.2f}x" if "compiled" in best
                else f"{'-':>9} {'-':>6}")
        print(f"{name:>5} {cfg.num_params() / 1e6:>7.2f}M {best['hf']:>13,.0f} {best['ours']:>9,.0f} "
              f"{best['ours'] / best['hf']:>5.2f}x {comp} {mfu['hf']:>7.1%} {mfu['ours']:>8.1%} "
              f"{mfu.get('compiled', float('nan')):>8.1%}", flush=True)
    print(f"matmul peak used for MFU: {peak * 1e3:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
