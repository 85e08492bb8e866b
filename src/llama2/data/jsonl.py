"""The one reader of JSON-lines files (corpus .jsonl, metrics.jsonl, and the data files of later stages), with
errors that name `file:line` and the reason.

    reader = read_jsonl(path)                         # a bad line is a Llama2Error ("a.jsonl:3: not valid JSON (...)")
    for lineno, obj in reader:                        # blank lines are skipped; obj is always a dict
        if problem := field_problem(obj, "text", str, "a string"):   # a caller's own checks report the same way:
            reader.bad(lineno, problem)               # raises BadLine, or (skip mode) counts it
            continue
        ...

    reader = read_jsonl(path, on_bad_line="skip")     # bad lines are counted, the first few reasons kept
    ...
    if reader.skipped:
        print(reader.summary(), file=sys.stderr)      # "a.jsonl: skipped 2 bad lines (a.jsonl:3: not valid JSON ...)"

A line is bad when it is not valid UTF-8, not valid JSON, or not a JSON object. A `.gz` file is read through gzip.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..atomic import atomic_write_text
from ..errors import Llama2Error

T = TypeVar("T")

OnBadLine = Literal["error", "skip"]
KEEP_REASONS = 5  # how many reasons a skip-mode reader remembers


class BadLine(Llama2Error):
    """One bad line of a data file; the message is `path:line: reason` (plus `; hint` when given)."""

    def __init__(self, path: Path | str, lineno: int, reason: str, hint: str = "") -> None:
        self.path, self.lineno, self.reason = Path(path), lineno, reason
        super().__init__(f"{path}:{lineno}: {reason}" + (f"; {hint}" if hint else ""))


class JsonlReader:
    """Iterates (line number, object) over a JSON-lines file; see the module docstring.

    on_bad_line: "error" raises BadLine at the first bad line; "skip" counts bad lines (`skipped`) and keeps the
    first KEEP_REASONS messages (`reasons`). hint: appended to every error message (what a line should hold).
    progress: called with the byte length of every line read (for a progress bar over bytes). arrays: a line may
    also be a JSON array (yielded as a list), e.g. a dialogue written as a bare list of messages."""

    def __init__(self, path: Path | str, *, on_bad_line: OnBadLine = "error", hint: str = "",
                 progress: Callable[[int], Any] | None = None, arrays: bool = False) -> None:
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
        self.path = Path(path)
        self.on_bad_line = on_bad_line
        self.hint = hint
        self.progress = progress
        self.arrays = arrays
        self.skipped = 0
        self.reasons: list[str] = []

    def bad(self, lineno: int, reason: str) -> None:
        """Report line `lineno` as bad: raise BadLine ("error") or count it and keep its message ("skip")."""
        err = BadLine(self.path, lineno, reason, self.hint)
        if self.on_bad_line == "error":
            raise err
        self.skipped += 1
        if len(self.reasons) < KEEP_REASONS:
            self.reasons.append(str(err))

    def summary(self) -> str:
        """One line for the user about the skipped lines ("" when none were skipped)."""
        return skipped_summary(self.path, self.skipped, self.reasons)

    def finish(self, items: list[T], what: str, hint: str = "") -> list[T]:
        """`items` read from the file: prints the skipped lines' summary if any; a Llama2Error when none are left
        (`what` names them: "prompts")."""
        if self.skipped:
            print(self.summary(), flush=True)
        if not items:
            raise Llama2Error(f"{self.path}: no {what}" + (f"; {hint}" if hint else ""))
        return items

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        self.skipped, self.reasons = 0, []  # counts are per pass over the file
        try:
            f = gzip.open(self.path, "rb") if self.path.suffix == ".gz" else self.path.open("rb")
        except OSError as e:
            raise Llama2Error(f"cannot read {self.path}: {e.strerror}") from None
        with f:
            for lineno, raw in enumerate(_lines(f, self.path), 1):
                if self.progress is not None:
                    self.progress(len(raw))
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.bad(lineno, f"not valid UTF-8 (byte {e.start} of the line); convert the file to UTF-8")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    self.bad(lineno, f"not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(obj, dict) and not (self.arrays and isinstance(obj, list)):
                    self.bad(lineno, f"not a JSON object{' or array' if self.arrays else ''} (got {json_kind(obj)})")
                    continue
                yield lineno, obj


def _lines(f: Any, path: Path) -> Iterator[bytes]:
    """The file's lines; a corrupt gzip file is one clear error."""
    try:
        yield from f
    except (OSError, EOFError) as e:
        raise Llama2Error(f"cannot read {path}: not a valid gzip file ({e})") from None


def skipped_summary(path: Path | str, skipped: int, reasons: list[str]) -> str:
    """"FILE: skipped N bad lines (first reasons; ...)", or "" when nothing was skipped."""
    if not skipped:
        return ""
    more = ", ..." if skipped > len(reasons) else ""
    return f"{path}: skipped {skipped} bad line{'s' if skipped != 1 else ''} ({'; '.join(reasons)}{more})"


def write_jsonl(path: Path | str, records: Iterable[Any]) -> Path:
    """Write one JSON value per line (UTF-8, non-ASCII kept), atomically."""
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)


def read_jsonl(path: Path | str, *, on_bad_line: OnBadLine = "error", hint: str = "",
               progress: Callable[[int], Any] | None = None, arrays: bool = False) -> JsonlReader:
    """A JsonlReader over `path`: iterate it for (line number, object) pairs."""
    return JsonlReader(path, on_bad_line=on_bad_line, hint=hint, progress=progress, arrays=arrays)


def field_problem(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> str | None:
    """Why obj[key] is not a `kind` ('no "text" field', '"text" is a number, not a string'), or None if it is.
    `what` names the expected kind for the message ("a string", "a list of messages"); a JSON true/false only
    counts as an int when `kind` includes bool."""
    if key not in obj:
        return f'no "{key}" field'
    value, kinds = obj[key], kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        return f'"{key}" is {json_kind(value)}, not {what}'
    return None


def json_kind(value: Any) -> str:
    """The JSON name of a decoded value's type, with an article."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
