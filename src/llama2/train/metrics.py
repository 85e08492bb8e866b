"""Run metrics: the metrics.jsonl log (one JSON object per logged step), model FLOPs and MFU.

MFU (model FLOPs utilisation) = flops_per_token * tokens_per_s / (peak_flops_per_device * devices).
flops_per_token = 6 * N + 12 * n_layers * dim * seq_len (PaLM, appendix B): N counts every parameter that
takes part in a matmul (all but the token embedding table), 6 = forward (2) + backward (4), and the second
term is attention's score and value matmuls. Recomputation from activation checkpointing is not counted.
The peak is the recipe's `peak_tflops` if set, else the dense bf16 (or tf32/fp32) tensor-core figure of known
GPUs, else (CPU, unknown GPU) a matmul benchmark of a few hundred milliseconds in the training dtype.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..config import ModelConfig
from ..data.jsonl import read_jsonl

# Dense (no sparsity) peak TFLOP/s per GPU: (bf16/fp16, tf32).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.0),
    "H100 SXM": (989.0, 494.0),
    "H100 PCIe": (756.0, 378.0),
    "H100 NVL": (835.0, 418.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), see the module docstring."""
    n_matmul = cfg.num_params() - cfg.vocab_size * cfg.dim
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.dim * seq_len


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Achieved matmul throughput (TFLOP/s) of this device in `dtype`: the best of several timed runs."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        reps = 4
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        dt = time.perf_counter() - t0
        best = max(best, reps * 2 * size**3 / dt / 1e12)
        if time.perf_counter() > deadline:
            return best


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> float:
    """Per-device peak TFLOP/s for MFU (see the module docstring)."""
    if override:
        return float(override)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return half if dtype in (torch.bfloat16, torch.float16) else tf32
        return measure_matmul_tflops(device, dtype, size=4096)
    # CPUs: the best of a few sizes, so one noisy sample on a shared machine does not inflate MFU
    return max(measure_matmul_tflops(device, dtype, size=n, seconds=0.3) for n in (512, 1024, 2048))


class MetricsLog:
    """Append-only metrics.jsonl; only the main process writes. Each record is flushed at once."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()

    def truncate(self, last_step: int) -> None:
        """Keep only well-formed records with step <= last_step (after a resume), rewriting atomically."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= last_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; bad lines (a torn last line of a killed run) are skipped."""
    return [rec for _, rec in read_jsonl(path, on_bad_line="skip")]
