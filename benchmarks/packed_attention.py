"""Packed rows (several dialogues per row, each attending only to itself): forward + backward of a training step
with the block-diagonal causal mask against each dialogue taken out of its row (llama2.model.PackedRows), and
against plain causal attention over the whole row (not exact for packed rows: the bound neither can beat), on the
same random model (default the world's: dim 256, 4 layers, 8 heads, vocab 1,024), bf16 autocast, in one process.
Rows are cut at random into the given number of dialogues. Prints ms per step and the ratios, for each row shape;
llama2.data.packing.APART_FROM_CPU (the row length from which a CPU takes dialogues apart) comes from this.

    .venv/bin/python benchmarks/packed_attention.py [--threads 2] [--shapes 8x256x5,8x512x4,4x1024x2,4x1024x10]
"""

from __future__ import annotations

import argparse
import time

import torch

from llama2.config import ModelConfig
from llama2.cpu import cpu_banner
from llama2.data.packing import attention_mask
from llama2.model import PackedRows, Transformer


def random_segments(rows: int, length: int, dialogues: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segments, positions) (rows, length): each row cut at random into `dialogues` runs, positions restarting."""
    g = torch.Generator().manual_seed(seed)
    segments = torch.zeros(rows, length, dtype=torch.long)
    positions = torch.zeros(rows, length, dtype=torch.long)
    for b in range(rows):
        cuts = torch.randperm(length - 1, generator=g)[:dialogues - 1].add(1).sort().values.tolist()
        for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length])):
            segments[b, lo:hi] = s
            positions[b, lo:hi] = torch.arange(hi - lo)
    return segments, positions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="8x256x5,8x512x4,4x1024x2,4x1024x10",
                    help="rows x tokens x dialogues per row, comma-separated")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_banner())
    print(f"torch {torch.__version__}, {args.threads} threads, model dim {args.dim}, {args.layers} layers")
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=8, vocab_size=1024,
                      max_seq_len=1024)
    model = Transformer(cfg)
    for shape in args.shapes.split(","):
        rows, length, dialogues = (int(x) for x in shape.split("x"))
        tokens = torch.randint(0, cfg.vocab_size, (rows, length))
        segments, positions = random_segments(rows, length, dialogues, seed=rows * length + dialogues)
        ways = {"mask": lambda: dict(positions=positions, mask=attention_mask(segments)),
                "apart": lambda: dict(mask=PackedRows.from_segments(segments)),
                "causal": lambda: {}}

        def step(way: str) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(tokens, targets=tokens, **ways[way]())
            loss.backward()

        ms = {}
        for way in ways:  # warm up each, then time them interleaved (the machine is shared and noisy)
            step(way)
            ms[way] = 0.0
        for _ in range(args.steps):
            for way in ways:
                t = time.perf_counter()
                step(way)
                ms[way] += (time.perf_counter() - t) * 1000 / args.steps
        print(f"rows {rows} x {length} tokens, {dialogues} dialogues each: mask {ms['mask']:.0f} ms, apart "
              f"{ms['apart']:.0f} ms, causal (inexact bound) {ms['causal']:.0f} ms; mask / apart "
              f"{ms['mask'] / ms['apart']:.2f}x, causal / apart {ms['causal'] / ms['apart']:.2f}x")


if __name__ == "__main__":
    main()
