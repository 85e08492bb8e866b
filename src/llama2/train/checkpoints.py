"""Checkpoint directories of a run and the training state beside the weights.

    RUN/checkpoints/step-000100/   config.json, model.safetensors, tokenizer files (the checkpoint format)
                                   optimizer-RRRRR-of-WWWWW.pt  each process's rows of the AdamW state
                                   training_state.pt  step, tokens seen, data position, RNG states, last metrics
    RUN/checkpoints/latest         the name of the newest complete checkpoint

The weights are gathered one tensor at a time and written by rank 0; the optimizer state (twice the fp32
weights) is never gathered: every process writes its own FSDP shard (rows of dim 0, keyed by parameter name,
with their offset and the full shape), and a resume with any number of processes reads the rows it owns from
whichever files hold them (memory-mapped). All files load with `torch.load(weights_only=True)`.

A checkpoint is written into RUN/checkpoints/.tmp-step-NNNNNN-PID, every file fsynced, then renamed into place;
`latest` is rewritten (temp file, fsync, rename) only after that, and older checkpoints beyond keep_last are
deleted last. A process killed at any moment leaves `latest` naming a complete checkpoint (or no `latest`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_write_text, fsync_dir
from ..errors import Llama2Error

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINING_STATE = "training_state.pt"
OPTIMIZER_STATE = "optimizer.pt"  # one unsharded file: the format of earlier checkpoints, still read
_OPT_SHARD_RE = re.compile(r"^optimizer-(\d{5})-of-(\d{5})\.pt$")
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none yet."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = checkpoints_dir(run_dir) / name
    if not _STEP_RE.match(name) or not (path / TRAINING_STATE).is_file():
        raise Llama2Error(f"{pointer} names {name!r}, which is not a complete checkpoint; point it at an existing "
                          f"step-NNNNNN directory of {checkpoints_dir(run_dir)} or delete it to start over")
    return path


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step-NNNNNN directories, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_stale(run_dir: Path) -> None:
    """Delete half-written checkpoints and temp files (hidden names) left by a killed process."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def staging_dir(run_dir: Path, step: int) -> Path:
    """A fresh temporary path (not created) to write checkpoint `step` into."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".tmp-{step_name(step)}-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    return path


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    for d in sorted({p.parent for p in path.rglob("*")} | {path}):
        fsync_dir(d)


def commit_checkpoint(run_dir: Path, staging: Path, step: int, keep_last: int) -> Path:
    """fsync the staged checkpoint, rename it into place, point `latest` at it, prune old ones."""
    root = checkpoints_dir(run_dir)
    final = root / step_name(step)
    _fsync_tree(staging)
    if final.exists():  # left by a run killed after its rename but before `latest` moved; not referenced
        shutil.rmtree(final)
    os.rename(staging, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def optimizer_shard_name(rank: int, world_size: int) -> str:
    return f"optimizer-{rank:05d}-of-{world_size:05d}.pt"


def _shard_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, end) of dim 0 held by `rank`: FSDP2 splits like torch.chunk (equal chunks, last smaller)."""
    size = -(-n // world_size)
    return min(rank * size, n), min((rank + 1) * size, n)


def local_rows(t: Tensor) -> tuple[Tensor, int, tuple[int, ...]]:
    """(this process's local tensor, its first row in the full tensor, the full shape) of a plain or
    dim-0-sharded DTensor."""
    to_local = getattr(t, "to_local", None)
    if to_local is None:
        return t, 0, tuple(t.shape)
    from torch.distributed.tensor import Shard

    mesh, local = t.device_mesh, to_local()
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise Llama2Error(f"cannot checkpoint a tensor sharded as {t.placements} on a {mesh.ndim}-D mesh; "
                          "only FSDP2's dim-0 sharding is supported")
    start, end = _shard_rows(t.shape[0], mesh.get_local_rank(), mesh.size())
    if local.shape[0] != end - start:
        raise Llama2Error(f"unexpected FSDP shard: {local.shape[0]} rows, expected {end - start}")
    return local, start, tuple(t.shape)


def save_optimizer_shard(osd: dict[str, Any], directory: Path, rank: int, world_size: int) -> Path:
    """Write this process's part of an optimizer state dict (`get_optimizer_state_dict`, keyed by name)."""
    state: dict[str, dict[str, Any]] = {}
    for name, entries in osd["state"].items():
        state[name] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                local, start, shape = local_rows(value)
                value = {"rows": local.detach().cpu(), "start": start, "shape": list(shape)}
            state[name][key] = value
    path = directory / optimizer_shard_name(rank, world_size)
    save_torch({"format": 2, "rank": rank, "world_size": world_size, "state": state,
                "param_groups": osd["param_groups"]}, path)
    return path


def _read_optimizer_shards(ckpt: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in ckpt.iterdir() if _OPT_SHARD_RE.match(p.name))
    if not files:
        if (ckpt / OPTIMIZER_STATE).is_file():  # unsharded: every tensor is one piece starting at row 0
            full = load_torch(ckpt / OPTIMIZER_STATE)
            for entries in full["state"].values():
                for key, v in entries.items():
                    if isinstance(v, Tensor):
                        entries[key] = {"rows": v, "start": 0, "shape": list(v.shape)}
            return [full]
        raise Llama2Error(f"{ckpt} has no optimizer state (optimizer-*.pt); the checkpoint is incomplete, delete it")
    world = {int(_OPT_SHARD_RE.match(p.name).group(2)) for p in files}
    if len(world) != 1 or len(files) != next(iter(world)):
        raise Llama2Error(f"{ckpt}: optimizer shard files {[p.name for p in files]} are not one complete set; "
                          "the checkpoint is damaged, delete it")
    return [load_torch(p, mmap=True) for p in files]


def load_optimizer_rows(ckpt: Path, template: dict[str, Any]) -> dict[str, Any]:
    """Fill `template` (this process's `get_optimizer_state_dict`, state initialised) in place with the saved
    optimizer state, whatever number of processes wrote it; returns it with the saved param_groups."""
    shards = _read_optimizer_shards(ckpt)
    for name, entries in template["state"].items():
        for key, target in entries.items():
            if not isinstance(target, Tensor):
                continue
            local, start, shape = local_rows(target)
            pieces = [sh["state"].get(name, {}).get(key) for sh in shards]
            pieces = [p for p in pieces if p is not None]
            if not pieces:
                raise Llama2Error(f"{ckpt}: no optimizer state {key!r} for {name!r}; the checkpoint was written for "
                                  "another model, use the recipe it was trained with")
            if list(pieces[0]["shape"]) != list(shape):
                raise Llama2Error(f"{ckpt}: optimizer state {key!r} of {name!r} has shape {pieces[0]['shape']}, the "
                                  f"model's is {list(shape)}; use the recipe the checkpoint was trained with")
            if local.ndim == 0:
                local.copy_(pieces[0]["rows"])
                continue
            end, filled = start + local.shape[0], 0
            for p in pieces:
                lo, hi = max(start, p["start"]), min(end, p["start"] + p["rows"].shape[0])
                if lo < hi:
                    local[lo - start:hi - start].copy_(p["rows"][lo - p["start"]:hi - p["start"]])
                    filled += hi - lo
            if filled != end - start:
                raise Llama2Error(f"{ckpt}: the optimizer shards cover {filled} of rows {start}-{end} of {name!r}; "
                                  "the checkpoint is damaged, delete it")
    template["param_groups"] = shards[0]["param_groups"]
    return template


def save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path, mmap: bool = False) -> Any:
    """Read a training-state file (tensors, dicts, lists, numbers, strings only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise Llama2Error(f"checkpoint file missing: {path}; the checkpoint is incomplete, delete it") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise Llama2Error(f"cannot read {path}: {e}; the file is damaged or not a training-state file") from None


# ---------------------------------------------------------------------------------------------------------------
# RNG states (python, numpy, torch CPU and CUDA), stored as tensors / plain data for weights_only loading


def capture_rng() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    npst = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": {"key": torch.from_numpy(npst["state"]["key"].astype(np.int64)), "pos": int(npst["state"]["pos"]),
                  "has_gauss": int(npst["has_gauss"]), "gauss": float(npst["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
