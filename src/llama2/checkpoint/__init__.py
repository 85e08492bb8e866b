"""Checkpoint I/O: the Hugging Face Llama layout (the project's on-disk format) and Meta's layout.

    model = load_model("llama-2-7b")              # Meta download dir (params.json + consolidated.*.pth)
    model = load_model("Llama-2-7b-hf", dtype="bf16")   # HF dir (config.json + model*.safetensors)
    save_model(model, "out", tokenizer=tok)       # HF layout, atomically
    save_meta(model, "out-meta", shards=2)        # Meta layout, 2 model-parallel ranks

Loading builds the model on the meta device and materialises each tensor once, in its final dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..device import resolve_device
from ..errors import Llama2Error
from ..model import Transformer
from . import hf, meta
from .hf import read_rows_into
from .common import parse_dtype
from .meta import save_meta as _save_meta

__all__ = ["load_model", "load_config", "save_model", "save_meta", "detect_layout", "read_rows_into"]


def detect_layout(path: Path | str) -> str:
    """"hf" (config.json) or "meta" (params.json); a clear error for anything else."""
    p = Path(path).expanduser()
    if not p.exists():
        raise Llama2Error(f"checkpoint directory {p} does not exist; check the path")
    if not p.is_dir():
        raise Llama2Error(f"{p} is a file; give the checkpoint directory (holding config.json or params.json)")
    if (p / hf.CONFIG).is_file():
        return "hf"
    if (p / meta.PARAMS).is_file():
        return "meta"
    inner = sorted(q.name for q in p.iterdir() if q.is_dir() and ((q / hf.CONFIG).is_file() or
                                                                  (q / meta.PARAMS).is_file()))
    hint = f"; it has checkpoint subdirectories {inner[:6]}: point at one of them" if inner else ""
    raise Llama2Error(f"{p}: unknown checkpoint layout: neither {hf.CONFIG} (Hugging Face) nor {meta.PARAMS} "
                      f"(Meta) is there{hint}")


def load_config(path: Path | str) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (reads only configs, and for Meta's vocab_size -1 one shape)."""
    p = Path(path).expanduser()
    if detect_layout(p) == "hf":
        return hf.config_from_hf(hf.read_json(p / hf.CONFIG), p / hf.CONFIG)
    params = hf.read_json(p / meta.PARAMS)
    first = meta.shard_files(p)[0]
    vocab = params.get("vocab_size", -1) if isinstance(params, dict) else -1
    if not (isinstance(vocab, int) and vocab > 0):
        vocab = meta._vocab(params, meta.load_pth(first)[0], first)
    return meta.config_from_params(params, vocab, p / meta.PARAMS)


def load_model(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None, *,
               progress: bool = False) -> Transformer:
    """Open a Hugging Face or Meta checkpoint directory as a Transformer.

    dtype None keeps the checkpoint's dtype (config.json's dtype, else the tensors'). Each tensor is read once,
    straight into its final dtype and device; the model is never held twice.
    """
    p = Path(path).expanduser()
    layout = detect_layout(p)
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    dt = parse_dtype(dtype)
    loader = hf.load_hf if layout == "hf" else meta.load_meta
    return loader(p, dev, dt, progress)


def save_model(model: Transformer, path: Path | str, tokenizer: Any = None, *, max_shard_bytes: int = 5 * 2**30,
               dtype: torch.dtype | str | None = None, progress: bool = False,
               fetch: Callable[[str], torch.Tensor] | None = None) -> Path:
    """Write the Hugging Face layout atomically: config.json, model.safetensors (sharded above max_shard_bytes,
    with model.safetensors.index.json), generation_config.json, and the tokenizer's files if one is given
    (any object with `.save(directory)`). dtype None keeps the model's dtype.

    `fetch(name)` (our parameter name), if given, supplies each tensor's data at the moment it is written, in
    state_dict order, and `model` may be a meta-device skeleton: a sharded model is saved one gathered tensor
    at a time."""
    return hf.save_hf(model, Path(path), tokenizer, max_shard_bytes, parse_dtype(dtype), progress, fetch)


def save_meta(model: Transformer, path: Path | str, shards: int = 1, *, dtype: torch.dtype | str | None = None,
              tokenizer: Any = None, progress: bool = False) -> Path:
    """Write Meta's layout atomically: params.json + consolidated.NN.pth for `shards` model-parallel ranks, q/k
    rows permuted back to Meta's interleaved rotary order."""
    return _save_meta(model, Path(path), shards, dtype=parse_dtype(dtype), tokenizer=tokenizer, progress=progress)
