"""Extra host memory taken by saving a checkpoint of an FSDP2-sharded run, per process.

Ours (`Trainer.save`: weights gathered one tensor at a time and written by rank 0, optimizer state written by
every process as its own shard) against the usual full-state-dict save (torch.distributed.checkpoint.state_dict
`get_model_state_dict` / `get_optimizer_state_dict` with full_state_dict=True, cpu_offload=True, then torch.save
on rank 0), in the same run on the same sharded model. Peak resident memory during each save is read from
/proc/self/status (VmHWM, reset before each save through /proc/self/clear_refs) minus the resident memory before.

    python benchmarks/save_memory.py                        # 2 CPU processes (gloo), ~170M parameters
    python benchmarks/save_memory.py --nproc 4 --dim 2048 --layers 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_during(fn) -> int:
    """Bytes of resident memory above the starting point at the peak of fn()."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from llama2.config import ModelConfig
    from llama2.model import Transformer
    from llama2.train.config import OptimConfig, TrainRecipe
    from llama2.train.loop import Trainer
    from llama2.stages.pretrain import causal_lm_loss

    torch.set_num_threads(1)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, vocab_size=args.vocab,
                      multiple_of=256, max_seq_len=64)
    batch = torch.randint(0, cfg.vocab_size, (1, 65))

    class Repeat:
        def next(self) -> list:
            return [batch]

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    out = Path(args.out)
    recipe = TrainRecipe(out_dir=str(out / "run"), max_steps=10, batch_size=1, device="cpu", precision="fp32",
                         optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"))
    trainer = Trainer(recipe, lambda: Transformer(cfg), causal_lm_loss, Repeat(), quiet=True)
    trainer.train_step(trainer.batches.next())
    rank = dist.get_rank()

    def full_save() -> None:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(trainer.model, options=opts)
        osd = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)
        if rank == 0:
            torch.save({"model": msd, "optimizer": osd}, out / "full.pt")
        dist.barrier()

    results = {}
    for name, fn in (("ours", trainer.save), ("full", full_save), ("ours again", trainer.save)):
        results[name] = _peak_during(fn)
    weights = sum(p.numel() for p in trainer.model.parameters()) * 4
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, results)
    if rank == 0:
        print(f"{cfg.num_params() / 1e6:.0f}M parameters, {dist.get_world_size()} processes; fp32 weights "
              f"{weights / MIB:,.0f} MiB, AdamW state {2 * weights / MIB:,.0f} MiB")
        print(f"{'rank':>4} {'ours MiB':>9} {'full-state MiB':>15} {'full / ours':>11}")
        for r, res in enumerate(rows):
            ours = min(res["ours"], res["ours again"])
            print(f"{r:>4} {ours / MIB:>9,.0f} {res['full'] / MIB:>15,.0f} {res['full'] / max(ours, MIB):>10.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="save-memory-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, "--worker", "--out", tmp, "--dim", str(args.dim), "--layers", str(args.layers),
               "--vocab", str(args.vocab)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
