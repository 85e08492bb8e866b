"""What this CPU can do, read once from /proc/cpuinfo (Linux): its model name and feature flags. Kernels and
the training precision are chosen from these at run time; every benchmark prints `cpu_banner()`."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The features that decide which kernels and dtypes run here.
KEY_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or "unknown CPU", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", "unknown CPU", platform.processor()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    return _cpuinfo()[1]


def has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), where bf16 matmuls beat fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_banner() -> str:
    """One line for benchmark output: the CPU model, logical CPUs and which of KEY_FLAGS it has."""
    import torch  # only the banner needs torch: the CPU's flags are read without it

    flags = cpu_flags()
    have = " ".join(f for f in KEY_FLAGS if f in flags) or "none of " + " ".join(KEY_FLAGS)
    return (f"{cpu_model()}; {os.cpu_count()} logical CPUs; flags: {have}; torch cpu capability "
            f"{torch.backends.cpu.get_cpu_capability()}")
