"""Checkpoint directories of a run and the training state beside the weights.

    RUN/checkpoints/step-000100/   config.json, model.safetensors, tokenizer files (the checkpoint format)
                                   optimizer.pt       full (unsharded) optimizer state, keyed by parameter name
                                   training_state.pt  step, tokens seen, data position, RNG states, last metrics
    RUN/checkpoints/latest         the name of the newest complete checkpoint

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

from ..atomic import atomic_write_text, fsync_dir
from ..errors import Llama2Error

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINING_STATE = "training_state.pt"
OPTIMIZER_STATE = "optimizer.pt"
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


def save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path) -> Any:
    """Read a training-state file (tensors, dicts, lists, numbers, strings only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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
