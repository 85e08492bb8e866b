"""Checkpoints of a run: directories, atomic commit, and the manager that saves and restores named parts.

    RUN/checkpoints/step-000100/   config.json, model.safetensors, tokenizer files: the "model" part (the
                                   checkpoint format of llama2.checkpoint, through the stage's CheckpointIO)
                                   NAME/                        another model part (a saved reference model)
                                   optimizer-RRRRR-of-WWWWW.pt  each shard's rows of the "optimizer" part
                                   NAME-RRRRR-of-WWWWW.pt       ... of another optimizer part
                                   training_state.pt  every other part: step counters, data position, RNG
                                                      states (one per process), a stage's own state
    RUN/checkpoints/latest         the name of the newest complete checkpoint

`CheckpointManager` holds the parts: models (weights written through a CheckpointIO; a sharded model is
gathered one tensor at a time and written by rank 0), optimizers (never gathered: every process of the first
shard group writes its own FSDP shard, rows of dim 0 keyed by parameter name with their offset and the full
shape, as file RRRRR of WWWWW = its place in the group of WWWWW; under FSDP that group is every process, under
HSDP the other groups hold the same rows and write nothing; a resume with any number of processes and either
sharding reads the rows it owns from whichever files hold them, memory-mapped), and state parts
(anything with state_dict()/load_state_dict(), or a dict restored in place; plain data that
`torch.load(weights_only=True)` reads: tensors, numbers, strings, lists, dicts).

A checkpoint is written into RUN/checkpoints/.tmp-step-NNNNNN-PID, every file fsynced, then renamed into place;
`latest` is rewritten (temp file, fsync, rename) only after that, and older checkpoints beyond keep_last are
deleted last. A process killed at any moment leaves `latest` naming a complete checkpoint (or no `latest`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import atomic_write_text, fsync_dir, fsync_tree
from ..checkpoint.runs import LATEST, TRAINING_STATE, checkpoints_dir, latest_checkpoint, list_checkpoints
from ..errors import Llama2Error
from .distributed import DistEnv, all_gather_object, barrier, broadcast_object

MODEL = "model"  # the model part written at the top of the checkpoint directory
OPTIMIZER = "optimizer"
_PART_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


@runtime_checkable
class CheckpointIO(Protocol):
    """How a model part's weights are written and read back (llama2.checkpoint provides the causal LM's)."""

    def save(self, model: nn.Module, path: Path, fetch: Callable[[str], Tensor] | None = None) -> None:
        """Write the weights directory at `path` (which does not exist yet). With `fetch`, `model` is a meta
        skeleton and fetch(name) gives each state_dict tensor's data, to be requested in state_dict order."""

    def load_into(self, path: Path, targets: dict[str, tuple[Tensor, int]]) -> None:
        """Fill each state_dict entry's (local tensor, first row in the full tensor) in place from the weights
        directory at `path`, reading only those rows (each process reads its own FSDP shard)."""


class FnState:
    """A state part made of two functions, for plain values: FnState(lambda: self.n, lambda v: setattr(...))."""

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None]) -> None:  # noqa: A002
        self._get, self._set = get, set

    def state_dict(self) -> Any:
        return self._get()

    def load_state_dict(self, state: Any) -> None:
        self._set(state)


class RNGState:
    """This process's random number generators (python, numpy, torch CPU and CUDA) as a state part."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state)


@dataclass
class _ModelPart:
    model: nn.Module
    io: CheckpointIO
    skeleton: Callable[[], nn.Module] | None  # builds the unsharded model on the meta device (sharded saves)


@dataclass
class _OptimizerPart:
    model: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class _StatePart:
    obj: Any
    per_process: bool


class CheckpointManager:
    """Saves and restores a run's named parts atomically (see the module docstring). Every process calls
    save() and load() together; parts must be registered in the same order on every process."""

    def __init__(self, run_dir: Path, env: DistEnv, keep_last: int = 3) -> None:
        self.run_dir = Path(run_dir)
        self.env = env
        self.keep_last = keep_last
        self.parts: dict[str, _ModelPart | _OptimizerPart | _StatePart] = {}

    # ------------------------------------------------------------------------------------------ registering

    def _claim(self, name: str) -> None:
        if not _PART_NAME_RE.match(name):
            raise Llama2Error(f"checkpoint part name {name!r}: use letters, digits and _ (starting with a letter)")
        if name in self.parts:
            raise Llama2Error(f"checkpoint part {name!r} is registered twice; give each part its own name")

    def add_model(self, name: str, model: nn.Module, io: CheckpointIO,
                  skeleton: Callable[[], nn.Module] | None = None) -> None:
        """Weights of `model`, written through `io` (at the top of the checkpoint for name "model", else in
        the subdirectory `name`). A sharded model needs `skeleton`: a function building it unsharded."""
        self._claim(name)
        if self.env.enabled and skeleton is None:
            raise Llama2Error(f"model part {name!r}: a sharded model needs skeleton= (a function that builds it)")
        self.parts[name] = _ModelPart(model, io, skeleton)

    def add_optimizer(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer over (some of) `model`'s parameters; each process of the first shard group writes its own
        shard."""
        self._claim(name)
        self.parts[name] = _OptimizerPart(model, optimizer)

    def add_state(self, name: str, obj: Any, per_process: bool = False) -> None:
        """An object with state_dict()/load_state_dict(), or a dict (restored in place). per_process: each
        process keeps its own (e.g. RNG); resumed with another number of processes, every one takes rank 0's."""
        self._claim(name)
        if not (isinstance(obj, dict) or (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"))):
            raise Llama2Error(f"state part {name!r}: {type(obj).__name__} has no state_dict()/load_state_dict(); "
                              "pass such an object, a dict, or wrap a value in FnState(get, set)")
        self.parts[name] = _StatePart(obj, per_process)

    def remove(self, name: str) -> None:
        self.parts.pop(name, None)

    # ------------------------------------------------------------------------------------------ save / load

    def latest(self) -> Path | None:
        """The checkpoint `latest` names (rank 0 reads it, every process gets it), or None."""
        found = latest_checkpoint(self.run_dir) if self.env.is_main else None
        found = broadcast_object(str(found) if found else None, self.env)
        return Path(found) if found else None

    def save(self, step: int) -> Path:
        """Write checkpoint step-NNNNNN of every part and make it the latest; returns its path."""
        env, main = self.env, self.env.is_main
        staging = staging_dir(self.run_dir, step) if main else None
        models = [(n, p) for n, p in self.parts.items() if isinstance(p, _ModelPart)]
        models.sort(key=lambda item: item[0] != MODEL)  # the top-level one first: it creates the directory
        if main and not any(n == MODEL for n, _ in models):
            staging.mkdir()
        for name, part in models:
            _save_weights(part, staging if name == MODEL else (staging / name if main else None), env)
        staging = Path(broadcast_object(str(staging) if main else None, env))
        barrier(env)  # the staging directory exists for everyone
        for name, part in self.parts.items():
            if isinstance(part, _OptimizerPart):
                # torch.distributed.checkpoint and .tensor take ~1 s to import: only when needed
                from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

                osd = get_optimizer_state_dict(part.model, part.optimizer)
                if env.first_replica:  # HSDP's other shard groups hold the same rows
                    save_optimizer_shard(osd, staging / optimizer_shard_name(env.shard_rank, env.shards, name))
                del osd
        shared: dict[str, Any] = {}
        per_process: dict[str, list[Any]] = {}
        for name, part in self.parts.items():
            if not isinstance(part, _StatePart):
                continue
            state = dict(part.obj) if isinstance(part.obj, dict) else part.obj.state_dict()
            if main or part.per_process:
                check_plain(state, f"state part {name!r}")
            if part.per_process:
                per_process[name] = all_gather_object(state, env)
            else:
                shared[name] = state
        barrier(env)  # every optimizer shard is written
        final = None
        if main:
            save_torch({"step": step, "world_size": env.world_size, "parts": shared, "per_process": per_process},
                       staging / TRAINING_STATE)
            final = commit_checkpoint(self.run_dir, staging, step, self.keep_last)
        final = broadcast_object(str(final) if final else None, env)
        return Path(final)

    def read_state(self, ckpt: Path) -> dict[str, Any]:
        """training_state.pt of `ckpt` (read on rank 0, given to every process)."""
        return broadcast_object(load_torch(ckpt / TRAINING_STATE) if self.env.is_main else None, self.env)

    def load(self, ckpt: Path) -> dict[str, Any]:
        """Restore every registered part from `ckpt`; returns its training state. A part the checkpoint lacks,
        or a state part in it that nothing registered, is an error."""
        env = self.env
        ts = self.read_state(ckpt)
        if not isinstance(ts, dict) or "parts" not in ts:
            raise Llama2Error(f"{ckpt / TRAINING_STATE} is in an older format this version does not read; start "
                              "again in a new out_dir (or from its weights with init_from)")
        saved = set(ts["parts"]) | set(ts["per_process"])
        wanted = {n for n, p in self.parts.items() if isinstance(p, _StatePart)}
        if wanted != saved:
            raise Llama2Error(f"{ckpt} holds state parts {sorted(saved)}, this run has {sorted(wanted)}: it was "
                              "written by another stage or setup; resume it with that one or use a new out_dir")
        for name, part in self.parts.items():
            if isinstance(part, _ModelPart):
                _load_weights(part, ckpt if name == MODEL else ckpt / name, name)
            elif isinstance(part, _OptimizerPart):
                _load_optimizer(part, ckpt, name)
        for name, part in self.parts.items():
            if isinstance(part, _StatePart):
                if part.per_process:
                    states = ts["per_process"][name]
                    state = states[env.rank] if len(states) == env.world_size else states[0]
                else:
                    state = ts["parts"][name]
                if isinstance(part.obj, dict):
                    part.obj.clear()
                    part.obj.update(state)
                else:
                    part.obj.load_state_dict(state)
        return ts


def gathered_state(model: nn.Module, keep: bool):
    """(name, full CPU tensor) for each state_dict entry of a sharded model, gathered one at a time; every
    process must run it to the end (each step is a collective); only `keep` processes get the tensors."""
    for name, t in model.state_dict().items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, full.detach().cpu() if keep else None
        del full


def _save_weights(part: _ModelPart, path: Path | None, env: DistEnv) -> None:
    if not env.enabled:
        part.io.save(part.model, path)
        return
    tensors = gathered_state(part.model, env.is_main)

    def fetch(name: str) -> Tensor:
        got, t = next(tensors)
        if got != name:
            raise Llama2Error(f"internal: gathered {got!r} while saving {name!r}")
        return t

    try:
        if env.is_main:
            with torch.device("meta"):
                skeleton = part.skeleton()
            part.io.save(skeleton, path, fetch=fetch)
    finally:
        for _ in tensors:  # the other ranks' gathers, and rank 0's after an error: every one must run
            pass


def _load_weights(part: _ModelPart, path: Path, name: str) -> None:
    load_into = getattr(part.io, "load_into", None)
    if load_into is None:
        raise Llama2Error(f"the checkpoint IO of model part {name!r} ({type(part.io).__name__}) has no "
                          "load_into(path, targets); implement it to resume")
    if not path.exists():
        raise Llama2Error(f"{path} is missing: the checkpoint has no model part {name!r}; it was written by "
                          "another stage or setup, resume with that one or use a new out_dir")
    targets = {n: local_rows(t)[:2] for n, t in part.model.state_dict().items()}
    with torch.no_grad():
        load_into(path, targets)


def _load_optimizer(part: _OptimizerPart, ckpt: Path, name: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict  # ~1 s

    osd = load_optimizer_rows(ckpt, get_optimizer_state_dict(part.model, part.optimizer), name)
    try:
        set_optimizer_state_dict(part.model, part.optimizer, osd)
    except (RuntimeError, KeyError, ValueError) as e:
        raise Llama2Error(f"the optimizer state of {ckpt} does not fit this model/optimizer: {str(e)[:300]}; "
                          "use the recipe the checkpoint was trained with") from None


_PLAIN = (type(None), bool, int, float, str, bytes, Tensor, torch.dtype, torch.device, torch.Size)


def check_plain(obj: Any, where: str) -> None:
    """Raise Llama2Error unless `obj` is data that torch.load(weights_only=True) reads back."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, (dict, OrderedDict)):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise Llama2Error(f"{where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise Llama2Error(f"{where} is a {type(obj).__name__}, which checkpoints cannot hold; store tensors, numbers, "
                      "strings, lists and dicts (give the object state_dict()/load_state_dict() returning those)")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint directories


def step_name(step: int) -> str:
    return f"step-{step:06d}"


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


def commit_checkpoint(run_dir: Path, staging: Path, step: int, keep_last: int) -> Path:
    """fsync the staged checkpoint, rename it into place, point `latest` at it, prune old ones."""
    root = checkpoints_dir(run_dir)
    final = root / step_name(step)
    fsync_tree(staging)
    if final.exists():  # left by a run killed after its rename but before `latest` moved; not referenced
        shutil.rmtree(final)
    os.rename(staging, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state: one file per process of a shard group, rows of dim 0


def optimizer_shard_name(rank: int, world_size: int, part: str = OPTIMIZER) -> str:
    return f"{part}-{rank:05d}-of-{world_size:05d}.pt"


def _shard_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, end) of dim 0 held by `rank`: FSDP2 splits like torch.chunk (equal chunks, last smaller)."""
    size = -(-n // world_size)
    return min(rank * size, n), min((rank + 1) * size, n)


def local_rows(t: Tensor) -> tuple[Tensor, int, tuple[int, ...]]:
    """(this process's local tensor, its first row in the full tensor, the full shape) of a plain or
    dim-0-sharded DTensor (FSDP2's (Shard(0),), or HSDP's (Replicate(), Shard(0)))."""
    to_local = getattr(t, "to_local", None)
    if to_local is None:
        return t, 0, tuple(t.shape)
    from torch.distributed.tensor import Replicate, Shard  # ~1 s to import: only for a sharded (DTensor) tensor

    mesh, local = t.device_mesh, to_local()
    placements = tuple(t.placements)
    if placements.count(Shard(0)) != 1 or any(p != Shard(0) and not isinstance(p, Replicate) for p in placements):
        raise Llama2Error(f"cannot checkpoint a tensor sharded as {t.placements} on a {mesh.ndim}-D mesh; "
                          "only FSDP2's dim-0 sharding (replicated across HSDP's groups) is supported")
    dim = placements.index(Shard(0))
    start, end = _shard_rows(t.shape[0], mesh.get_local_rank(dim), mesh.size(dim))
    if local.shape[0] != end - start:
        raise Llama2Error(f"unexpected FSDP shard: {local.shape[0]} rows, expected {end - start}")
    return local, start, tuple(t.shape)


def save_optimizer_shard(osd: dict[str, Any], path: Path) -> Path:
    """Write this process's part of an optimizer state dict (`get_optimizer_state_dict`, keyed by name)."""
    state: dict[str, dict[str, Any]] = {}
    for name, entries in osd["state"].items():
        state[name] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                local, start, shape = local_rows(value)
                value = {"rows": local.detach().cpu(), "start": start, "shape": list(shape)}
            state[name][key] = value
    save_torch({"state": state, "param_groups": osd["param_groups"]}, path)
    return path


def _read_optimizer_shards(ckpt: Path, part: str) -> list[dict[str, Any]]:
    pattern = re.compile(rf"^{re.escape(part)}-(\d{{5}})-of-(\d{{5}})\.pt$")
    files = sorted(p for p in ckpt.iterdir() if pattern.match(p.name))
    if not files:
        raise Llama2Error(f"{ckpt} has no optimizer state ({part}-*.pt); the checkpoint is incomplete or was "
                          "written by another stage, delete it or resume with that stage")
    world = {int(pattern.match(p.name).group(2)) for p in files}
    if len(world) != 1 or len(files) != next(iter(world)):
        raise Llama2Error(f"{ckpt}: optimizer shard files {[p.name for p in files]} are not one complete set; "
                          "the checkpoint is damaged, delete it")
    return [load_torch(p, mmap=True) for p in files]


def load_optimizer_rows(ckpt: Path, template: dict[str, Any], part: str = OPTIMIZER) -> dict[str, Any]:
    """Fill `template` (this process's `get_optimizer_state_dict`, state initialised) in place with the saved
    optimizer state, whatever number of processes wrote it; returns it with the saved param_groups."""
    shards = _read_optimizer_shards(ckpt, part)
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
