"""Atomic file writes (temp file in the same directory, fsync, rename, fsync the directory): the one mechanism
every module uses, so a killed process never leaves a half-written file under a real name. Also `make_dir`, the
one way to create an output directory with a clear error."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import Llama2Error

TMP_SUFFIX = ".tmp"


def make_dir(path: Path | str, what: str = "output directory") -> Path:
    """Create directory `path` with its parents (fine if it exists); a failure is a Llama2Error naming `what`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise Llama2Error(f"cannot create {what} {path}: a file of that name exists; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Llama2Error(f"cannot create {what} {path}: {e.strerror}") from None
    return path


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it is durable (a no-op where the platform refuses)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on a clean exit flush, fsync and rename it onto `path`, else delete it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write obj as indented JSON (stable key order as given) atomically."""
    with atomic_open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def remove_stale_temps(directory: Path, prefixes: tuple[str, ...]) -> None:
    """Delete temp files a killed writer left in directory for targets whose names start with one of prefixes."""
    for p in directory.glob(f".*{TMP_SUFFIX}"):
        if p.is_file() and p.name[1:].startswith(prefixes):
            p.unlink(missing_ok=True)
