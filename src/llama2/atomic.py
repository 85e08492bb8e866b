"""Atomic writes, the one mechanism every module uses, so a killed process never leaves a half-written file or
directory under a real name: files (temp file in the same directory, fsync, rename, fsync the directory) and
whole directories (`atomic_directory`: written into a hidden sibling, fsynced, then swapped into place). Also
`make_dir`, the one way to create an output directory with a clear error."""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
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


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` and every directory holding them (so renames of the tree are durable)."""
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    for d in sorted({p.parent for p in path.rglob("*")} | {path}):
        fsync_dir(d)


@contextmanager
def atomic_directory(path: Path | str, *, what: str = "directory",
                     carry_over: Callable[[Path, Path], None] | None = None) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `path`; on a clean exit every file in it is fsynced and it replaces
    `path` as a whole (an atomic exchange where Linux offers one). `carry_over(old, new)` may first copy what
    the new directory should keep from an existing one. A process killed at any point leaves either the old
    directory or the new one (plus a hidden `.NAME.tmp-*` sibling), never a half-written `path`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise Llama2Error(f"cannot write the {what} {path}: it exists and is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise Llama2Error(f"cannot create the {what} next to {path}: {e.strerror}") from None
    try:
        yield tmp
        if carry_over is not None and path.exists():
            carry_over(path, tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _commit(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Llama2Error(f"cannot move the new {what} into {path}: {e.strerror}") from None


def _commit(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
    else:
        old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)
