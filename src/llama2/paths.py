"""Where things live: the cache of built-in data and models, user paths with `{cache}`, `~` and $VARS, and recipe
paths relative to the source checkout."""

from __future__ import annotations

import os
from pathlib import Path

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
