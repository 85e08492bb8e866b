"""The run directory's checkpoints, and how a recipe's `base` names a checkpoint.

    RUN/checkpoints/step-000100/   one complete checkpoint (the model in the HF layout, training state beside it)
    RUN/checkpoints/latest         the name of the newest complete checkpoint

A recipe's `base` is a checkpoint directory (HF or Meta layout) or a training run (or its `latest` pointer),
meaning its latest checkpoint. Writing checkpoints is llama2.train.checkpoints; this module only reads the layout.
Reading the `latest` pointer is llama2.paths (resolve_checkpoint), which the tokenizer and the loaders share.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import Llama2Error
from ..paths import (CHECKPOINTS, LATEST, STEP_RE, TRAINING_STATE, checkpoints_dir, expand_path,
                     latest_checkpoint, latest_pointer, resolve_checkpoint)
from ..tokenizer import Tokenizer

__all__ = ["CHECKPOINTS", "LATEST", "STEP_RE", "TRAINING_STATE", "checkpoints_dir", "latest_checkpoint",
           "list_checkpoints", "resolve_base", "base_exists", "load_tokenizer", "require_checkpoint"]


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step-NNNNNN directories, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_base(base: str) -> Path:
    """The checkpoint directory of `base`: itself, or a training run's latest checkpoint (resolve_checkpoint)."""
    return resolve_checkpoint(expand_path(base))


def base_exists(base: str) -> bool:
    """Whether `base` names a checkpoint (HF or Meta layout) or a run with one (or its `latest` pointer)."""
    p = expand_path(base)
    return (p / "config.json").is_file() or (p / "params.json").is_file() or latest_pointer(p) is not None


def load_tokenizer(base: Path) -> Tokenizer:
    """The tokenizer.model in a checkpoint directory, or beside it (as Meta's downloads lay it out)."""
    for d in (base, base.parent):  # Meta's download.sh puts tokenizer.model beside the model folders
        if (d / "tokenizer.model").is_file():
            return Tokenizer(d)
    raise Llama2Error(f"no tokenizer.model in {base} (or its parent); copy the base's tokenizer.model there")


def require_checkpoint(path: str, what: str) -> Path:
    """The checkpoint `path` names (see resolve_base); a clear error when there is none."""
    if not base_exists(path):
        raise Llama2Error(f"{what} {expand_path(path)} does not exist; give its checkpoint directory (HF or Meta "
                          "layout, or a training run), or set the recipe key that builds it (the llama2 command "
                          "builds it first)")
    return resolve_base(path)
