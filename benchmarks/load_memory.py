"""Peak memory of loading a ~1B-parameter checkpoint: llama2.load_model vs transformers' from_pretrained.

Writes a random checkpoint of the "1.1B" preset once (Hugging Face layout in bf16 and fp32, and Meta's layout in
bf16), then loads it in fresh subprocesses and prints, for each loader, the growth of peak resident memory
(ru_maxrss) over the process's resident memory before loading, divided by the bytes of the weights. A ratio of
1.0 means the loader never held more than the weights themselves. Each child also reads every weight after
loading, so a loader that only memory-maps its file pays for the pages it would touch in use.

    python benchmarks/load_memory.py [--preset 1.1B] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident bytes now (Linux /proc), else the peak so far."""
    return _proc_status("VmRSS") or peak_rss()


def peak_rss() -> int:
    """Peak resident bytes of this process image.

    getrusage's ru_maxrss survives exec: a child forked from a big parent starts with the parent's peak. Linux's
    VmHWM is the same high-water mark for this process image only, so it is preferred where it exists; the
    parent also stays small (the checkpoints are built in a subprocess of their own).
    """
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child(loader: str, path: str, dtype_name: str) -> None:
    """Runs in a fresh process: import, measure, load, touch every weight, measure again; print JSON."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if loader == "transformers":
        from transformers import LlamaForCausalLM

        load = lambda: LlamaForCausalLM.from_pretrained(path, dtype=dtype)  # noqa: E731
    else:
        from llama2 import load_model

        load = lambda: load_model(path, "cpu", dtype)  # noqa: E731
    before = current_rss()
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    after_load = peak_rss()
    weights = 0
    with torch.no_grad():
        for p in model.parameters():
            assert p.dtype == dtype
            p.sum()  # touch every byte
            weights += p.numel() * p.element_size()
    print(json.dumps({"before": before, "peak_load": after_load, "peak_used": peak_rss(), "weights": weights,
                      "seconds": seconds}))


def measure(loader: str, path: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", loader, str(path), dtype], capture_output=True,
                         text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode:
        raise SystemExit(f"{loader} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(preset: str, root: Path) -> dict[str, Path]:
    import torch

    from llama2 import ModelConfig, Transformer, save_model
    from llama2.checkpoint import save_meta

    dirs = {"hf-bf16": root / "hf-bf16", "hf-fp32": root / "hf-fp32", "meta-bf16": root / "meta-bf16"}
    if all((d / ".done").exists() for d in dirs.values()):
        return dirs
    cfg = ModelConfig.from_name(preset)
    print(f"building a random {preset} model ({cfg.num_params() / 1e9:.2f}B parameters) ...", flush=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_model(model, dirs["hf-bf16"], dtype=torch.bfloat16, progress=True)
    save_model(model, dirs["hf-fp32"], dtype=torch.float32, progress=True)
    save_meta(model, dirs["meta-bf16"], dtype=torch.bfloat16, progress=True)
    for d in dirs.values():
        (d / ".done").touch()
    return dirs


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        build(sys.argv[2], Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.1B")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints for a later run")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="llama2-load-memory-"))
    try:
        subprocess.run([sys.executable, __file__, "--build", args.preset, str(root)], check=True)
        dirs = build(args.preset, root)  # already built: only names the directories
        runs = [("hf-bf16", "bf16", "llama2"), ("hf-bf16", "bf16", "transformers"),
                ("hf-fp32", "fp32", "llama2"), ("hf-fp32", "fp32", "transformers"),
                ("hf-bf16", "fp32", "llama2"), ("hf-bf16", "fp32", "transformers"),  # converted while loading
                ("meta-bf16", "bf16", "llama2")]
        print(f"\n{'checkpoint':<11} {'as':<5} {'loader':<13} {'weights GB':>10} {'load s':>7} "
              f"{'peak/weights (load)':>20} {'peak/weights (load+use)':>24}")
        for ckpt, dtype, loader in runs:
            r = measure(loader, dirs[ckpt], dtype)
            w = r["weights"]
            print(f"{ckpt:<11} {dtype:<5} {loader:<13} {w / 1e9:>10.2f} {r['seconds']:>7.1f} "
                  f"{(r['peak_load'] - r['before']) / w:>20.2f} {(r['peak_used'] - r['before']) / w:>24.2f}",
                  flush=True)
        print("\nratio = (peak resident bytes - resident bytes before loading) / bytes of the weights; goal <= 1.2")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
