"""The run directory's checkpoints, and how a recipe's `base` names a checkpoint.

    RUN/checkpoints/step-000100/   one complete checkpoint (the model in the HF layout, training state beside it)
    RUN/checkpoints/latest         the name of the newest complete checkpoint

A recipe's `base` is a checkpoint directory (HF or Meta layout) or a training run, meaning its latest checkpoint.
Writing checkpoints is llama2.train.checkpoints; this module only reads the layout.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import Llama2Error
from ..paths import expand_path
from ..tokenizer import Tokenizer

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINING_STATE = "training_state.pt"
STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none yet."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = checkpoints_dir(run_dir) / name
    if not STEP_RE.match(name) or not (path / TRAINING_STATE).is_file():
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
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_base(base: str) -> Path:
    """The checkpoint directory of `base`: itself, or a training run's latest checkpoint."""
    p = expand_path(base)
    if (p / "checkpoints").is_dir() and not ((p / "config.json").is_file() or (p / "params.json").is_file()):
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise Llama2Error(f"base {p} is a training run without a checkpoint yet; finish that run first")
        return ckpt
    return p


def base_exists(base: str) -> bool:
    """Whether `base` names a checkpoint (HF or Meta layout) or a run with one."""
    p = expand_path(base)
    return (p / "config.json").is_file() or (p / "params.json").is_file() or (p / "checkpoints" / "latest").is_file()


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
