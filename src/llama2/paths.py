"""Where things live: the cache of built-in data and models, user paths with `{cache}`, `~` and $VARS, recipe
paths relative to the source checkout, and a training run's latest checkpoint:

    RUN/checkpoints/step-000100/   one complete checkpoint (the model in the HF layout, training state beside it)
    RUN/checkpoints/latest         the name of the newest complete checkpoint
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import Llama2Error

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding configs/ (for an editable install)


def cache_dir() -> Path:
    """Where built-in data (default corpus, tokenizer, shards) is cached: $LLAMA2_CACHE or ~/.cache/llama2."""
    return Path(os.environ.get("LLAMA2_CACHE") or Path.home() / ".cache" / "llama2")


def expand_path(path: str) -> Path:
    """`{cache}` -> cache_dir(), then `~` and $VARS expanded."""
    return Path(os.path.expanduser(os.path.expandvars(path.replace("{cache}", str(cache_dir())))))


def config_path(path: str) -> Path:
    """A recipe path as given, else relative to the source checkout (configs/...)."""
    p = expand_path(path)
    if p.is_file():
        return p
    alt = SOURCE_ROOT / path
    return alt if alt.is_file() else p


# ---------------------------------------------------------------------------------------------------------------
# A training run's checkpoints (written by llama2.train.checkpoints; read everywhere a path may name a run)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINING_STATE = "training_state.pt"
STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def read_latest(pointer: Path) -> Path:
    """The checkpoint a `latest` pointer file names (a complete step-NNNNNN directory beside it)."""
    pointer = Path(pointer)
    name = pointer.read_text().strip()
    path = pointer.parent / name
    if not STEP_RE.match(name) or not (path / TRAINING_STATE).is_file():
        raise Llama2Error(f"{pointer} names {name!r}, which is not a complete checkpoint; point it at an existing "
                          f"step-NNNNNN directory of {pointer.parent} or delete it to start over")
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none yet."""
    pointer = checkpoints_dir(run_dir) / LATEST
    return read_latest(pointer) if pointer.exists() else None


def is_run_dir(path: Path) -> bool:
    """A training run (it has checkpoints/) that is not itself a checkpoint (config.json or params.json)."""
    p = Path(path)
    return (p / CHECKPOINTS).is_dir() and not ((p / "config.json").is_file() or (p / "params.json").is_file())


def model_run(path: Path) -> Path | None:
    """The training run that holds the model of a stage run which fine-tunes through SFT in a sub-run: GAtt and
    safety distillation (`sft/`), rejection sampling (`iter-N/sft`, the last iteration that has a checkpoint);
    None for anything else."""
    p = Path(path)
    if not p.is_dir() or is_run_dir(p) or (p / "config.json").is_file() or (p / "params.json").is_file():
        return None
    if (p / "sft" / CHECKPOINTS / LATEST).is_file():
        return p / "sft"
    iterations = sorted((int(d.name[len("iter-"):]), d / "sft") for d in p.glob("iter-*")
                        if d.name[len("iter-"):].isdigit() and (d / "sft" / CHECKPOINTS / LATEST).is_file())
    return iterations[-1][1] if iterations else None


def latest_pointer(path: Path) -> Path | None:
    """The `latest` pointer file `path` stands for: itself, a run's checkpoints/ directory's, a training run's, or
    that of the run holding a stage's model (model_run: a GAtt, safety or rejection-sampling run); None for
    anything else (or a run without a checkpoint yet)."""
    p = Path(path)
    if p.name == LATEST and p.parent.name == CHECKPOINTS and p.is_file():
        return p
    if p.name == CHECKPOINTS and is_run_dir(p.parent) and (p / LATEST).is_file():
        return p / LATEST
    if is_run_dir(p) and (p / CHECKPOINTS / LATEST).is_file():
        return p / CHECKPOINTS / LATEST
    sub = model_run(p)
    return None if sub is None else sub / CHECKPOINTS / LATEST


def resolve_checkpoint(path: Path | str) -> Path:
    """The checkpoint directory `path` stands for: a training run, its checkpoints/ directory or its `latest`
    pointer -> the latest checkpoint; anything else -> itself (unchecked)."""
    p = Path(path)
    pointer = latest_pointer(p)
    if pointer is not None:
        return read_latest(pointer)
    if is_run_dir(p):
        raise Llama2Error(f"{p} is a training run without a checkpoint yet; finish that run first, or give a "
                          "checkpoint directory")
    return p
