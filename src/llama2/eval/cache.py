"""The evaluation results cache: one JSON file per (checkpoint content, task, data content, settings) key under
`$LLAMA2_CACHE/eval/results`, so running the same evaluation again is instant. A checkpoint's content hash
(sha256 over its files' names and bytes) is remembered per (path, size, mtime) so it is computed once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, make_dir
from ..paths import cache_dir

_CHUNK = 1 << 20


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _stat_key(files: list[Path]) -> str:
    return json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def content_hash(path: Path, memo: Path | None = None) -> str:
    """sha256 over the relative names and contents of the file, or of every file under the directory."""
    path = Path(path)
    files = _files(path)
    memo = memo or _memo_file()
    key = _stat_key(files)
    known = _read_memo(memo)
    if key in known:
        return known[key]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode() + b"\0")
        h.update(_file_digest(p).encode())
    digest = h.hexdigest()
    known[key] = digest
    make_dir(memo.parent, "eval cache directory")
    atomic_write_json(memo, known)
    return digest


def checkpoint_hash(directory: Path) -> str:
    """The content hash of a checkpoint directory's model files (config, weights, tokenizer, adapter)."""
    return content_hash(Path(directory))


def _memo_file() -> Path:
    return cache_dir() / "eval" / "hashes.json"


def _read_memo(memo: Path) -> dict[str, str]:
    try:
        data = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class ResultCache:
    """get(key) -> the stored dict or None; put(key, value) writes it atomically. key: any JSON-able dict."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.root / f"{key.get('task', 'task')}-{digest}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        try:
            stored = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        return stored.get("value") if isinstance(stored, dict) and stored.get("key") == key else None

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> None:
        make_dir(self.root, "eval results cache")
        atomic_write_json(self._path(key), {"key": key, "value": value})
