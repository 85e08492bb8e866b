"""Shared pieces of checkpoint I/O: dtype names, the rotary permutation, the lazy loading plan, atomic directories."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..atomic import atomic_directory as _atomic_directory
from ..config import ModelConfig
from ..dtypes import HF_DTYPE_NAME, parse_dtype  # noqa: F401  (used by hf.py and checkpoint/__init__.py)
from ..errors import Llama2Error
from ..model import Transformer


def to_interleaved(w: Tensor, n: int) -> Tensor:
    """Meta's interleaved rotary rows from Hugging Face's rotate-halves rows, for n heads."""
    rows, dim = w.shape
    hd = rows // n
    return w.view(n, 2, hd // 2, dim).transpose(1, 2).reshape(rows, dim)


# ---------------------------------------------------------------------------------------------------------------
# Releasing pages of memory-mapped source tensors (torch.load(mmap=True)) once they were copied.

_libc = None


def release_pages(t: Tensor) -> None:
    """Tell the kernel the pages of a memory-mapped, read-only source tensor are no longer needed.

    Only called on tensors that come from a private file mapping and were not written to: their pages drop out
    of this process's resident set and would be read again from the file if touched, so nothing is lost.
    """
    global _libc
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or not t.is_contiguous():
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
    except (OSError, AttributeError, ValueError):
        pass


# ---------------------------------------------------------------------------------------------------------------
# The loading plan: every parameter's shape and a function that materialises it in its final dtype and device.

@dataclass
class Source:
    """One parameter of the checkpoint: its shape, stored dtype, the file(s) it comes from and how to read it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    where: str  # the file name(s), for error messages
    read: Callable[[torch.dtype, torch.device], Tensor]


def build_model(config: ModelConfig, plan: dict[str, Source], dtype: torch.dtype, device: torch.device,
                what: Path, progress: bool = False, make: Callable[[], torch.nn.Module] | None = None,
                fresh: dict[str, Callable[[torch.dtype, torch.device], Tensor]] | None = None) -> Transformer:
    """Check the plan against the model's parameters, then materialise each tensor once and assign it.

    `make()` builds the skeleton (default: Transformer(config)), called under the meta device. `fresh` names
    the parameters the checkpoint is declared not to have (a new reward head) and makes each one; every other
    missing or unexpected tensor is an error."""
    fresh = fresh or {}
    with torch.device("meta"):
        model = make() if make is not None else Transformer(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = [n for n in expected if n not in plan and n not in fresh]
    unexpected = [n for n in plan if n not in expected]
    if missing:
        raise Llama2Error(f"{what}: checkpoint lacks tensor(s) {_few(missing)} that the config requires; the "
                          "weights are incomplete or the config does not describe them")
    if unexpected:
        raise Llama2Error(f"{what}: checkpoint has tensor(s) {_few([f'{n} ({plan[n].where})' for n in unexpected])} "
                          "that the config does not describe (e.g. more layers than n_layers); fix the config")
    for name, shape in expected.items():
        if name in plan and plan[name].shape != shape:
            raise Llama2Error(f"{plan[name].where}: tensor {name} has shape {list(plan[name].shape)} but the config "
                              f"implies {list(shape)}; the config does not match the weights")

    total = sum(_numel(s.shape) * dtype.itemsize for s in plan.values())
    state: dict[str, Tensor] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress, leave=False) as bar:
        for name in expected:
            if name in fresh:
                state[name] = fresh[name](dtype, device)
                continue
            t = plan[name].read(dtype, device)
            state[name] = t
            bar.update(t.numel() * t.element_size())
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _few(names: list[str], k: int = 4) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    raise Llama2Error("model has no parameters")


def check_materialised(model: torch.nn.Module) -> None:
    if any(p.is_meta for p in model.parameters()):
        raise Llama2Error("cannot save a model whose parameters are on the meta device (not loaded); "
                          "load weights first")


# ---------------------------------------------------------------------------------------------------------------
# Atomic directories: write everything into a hidden sibling, fsync, then move it into place in one step.

CHECKPOINT_FILE_PATTERNS = ("config.json", "generation_config.json", "params.json", "model*.safetensors",
                            "model.safetensors.index.json", "consolidated.*.pth", "adapter_config.json",
                            "adapter_model.safetensors")


def _carry_over(old: Path, new: Path) -> None:
    """Keep files of an existing directory that the new checkpoint does not replace (e.g. training state)."""
    for entry in old.iterdir():
        if (new / entry.name).exists() or any(entry.match(p) for p in CHECKPOINT_FILE_PATTERNS):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def atomic_directory(path: Path | str) -> contextlib.AbstractContextManager[Path]:
    """`llama2.atomic.atomic_directory` for a checkpoint: files of an existing directory that the new checkpoint
    does not write (other than stale weights and configs: training state, notes) are kept."""
    return _atomic_directory(path, what="checkpoint directory", carry_over=_carry_over)


def write_json(path: Path, obj: object) -> None:
    """Write JSON and fsync it (inside an atomic_directory, so no rename of its own is needed)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


