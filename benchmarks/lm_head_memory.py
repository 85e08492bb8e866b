"""Peak memory and time of the LM head + loss in one training step: llama2's fused `linear_cross_entropy`
against the plain PyTorch way, `F.cross_entropy(F.linear(x, w).float().flatten(0, 1), t, reduction="sum")`.

Both run forward + backward with x (1, tokens, dim) and w (vocab, dim) requiring grad, fp32, on the CPU; the
defaults are the Llama 2 7B head (dim 4096, vocabulary 32000). Each measurement runs in a fresh subprocess
(rounds interleave the two variants; the best time is kept). Memory is read from Linux /proc/self/status, not
from an allocator: `extra` = peak resident bytes (VmHWM) after the step - resident bytes (VmRSS) just before it,
with x, w and the targets already allocated. It includes the gradients x.grad and w.grad the step must produce.

    python benchmarks/lm_head_memory.py [--tokens 1024] [--dim 4096] [--vocab 32000] [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MIB = 1 << 20


def proc_status(field: str) -> int:
    """A byte count from /proc/self/status (VmRSS: resident now, VmHWM: peak resident of this process)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def child(variant: str, tokens: int, dim: int, vocab: int, threads: int) -> dict[str, float]:
    """One forward + backward of `variant` in this (fresh) process: its time and peak extra resident bytes."""
    import torch
    import torch.nn.functional as F

    from llama2.fused_ops import linear_cross_entropy

    torch.set_num_threads(threads)

    def step(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> None:
        if variant == "fused":
            loss = linear_cross_entropy(x, w, t.view(x.shape[:-1]))
        else:
            loss = F.cross_entropy(F.linear(x, w).float().flatten(0, 1), t, reduction="sum")
        loss.backward()

    def inputs(n: int, d: int, v: int) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(0)
        x = torch.randn(1, n, d, requires_grad=True)
        w = (torch.randn(v, d) * 0.02).requires_grad_()
        return x, w, torch.randint(0, v, (n,))

    step(*inputs(64, 64, 256))  # warm up the kernels and thread pool on a tiny problem
    args = inputs(tokens, dim, vocab)
    before = proc_status("VmRSS")
    t0 = time.perf_counter()
    step(*args)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "extra": proc_status("VmHWM") - before}


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", variant, *map(str, (args.tokens, args.dim, args.vocab, args.threads))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], *map(int, sys.argv[3:]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="positions in the step (batch * seq)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best time is kept")
    args = ap.parse_args()

    logits = args.tokens * args.vocab * 4
    grads = (args.tokens + args.vocab) * args.dim * 4
    print(f"LM head {args.vocab} x {args.dim}, {args.tokens} tokens, fp32, {args.threads} thread(s); "
          f"fp32 logits would be {logits / MIB:,.0f} MiB, x.grad + w.grad are {grads / MIB:,.0f} MiB")
    runs: dict[str, list[dict[str, float]]] = {"unfused": [], "fused": []}
    for _ in range(args.rounds):
        for variant, results in runs.items():
            results.append(measure(variant, args))
    mem = {k: max(r["extra"] for r in v) for k, v in runs.items()}
    sec = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
    print(f"{'variant':<8} {'peak extra MiB':>14} {'over grads MiB':>14} {'step s':>7}")
    for k in runs:
        print(f"{k:<8} {mem[k] / MIB:>14,.0f} {(mem[k] - grads) / MIB:>14,.0f} {sec[k]:>7.2f}")
    print(f"unfused / fused: memory {mem['unfused'] / mem['fused']:.2f}x, "
          f"memory over grads {(mem['unfused'] - grads) / max(mem['fused'] - grads, 1):.2f}x, "
          f"time {sec['unfused'] / sec['fused']:.2f}x")
    print("peak extra = VmHWM after the step - VmRSS before it (largest over rounds); step s = best over rounds")


if __name__ == "__main__":
    main()
