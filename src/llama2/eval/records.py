"""Reading a benchmark's local data file into records: JSONL (through llama2.data.jsonl), JSON (a list of objects,
or an object holding one under "examples", "data" or "rows"), headerless CSV (MMLU's per-subject files:
question, A, B, C, D, answer), or a directory of such files. Every record keeps where it came from (`file:line`,
for error messages) and its group: a "subject"/"topic"/"task" field, else the file's stem (MMLU's and BBH's
one-file-per-subject layouts)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.jsonl import BadLine, read_jsonl
from ..errors import Llama2Error

SUFFIXES = (".jsonl", ".json", ".csv")
CSV_FIELDS = ("question", "A", "B", "C", "D", "answer")


@dataclass
class Record:
    obj: dict[str, Any]
    path: Path
    line: int
    group: str

    def bad(self, reason: str) -> BadLine:
        """The error for this record: `file:line: reason`."""
        return BadLine(self.path, self.line, reason)


def read_records(path: Path) -> list[Record]:
    """Every record of the file, or of every data file in the directory (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise Llama2Error(f"{path}: no {', '.join(SUFFIXES)} files in this directory")
        return [r for f in files for r in _read_file(f)]
    return _read_file(path)


def _group(obj: dict[str, Any], path: Path) -> str:
    for key in ("subject", "topic", "task"):
        if isinstance(obj.get(key), str) and obj[key]:
            return obj[key]
    stem = path.stem
    return stem[:-5] if stem.endswith(("_test", "-test")) else stem


def _read_file(path: Path) -> list[Record]:
    if path.suffix == ".csv":
        return _read_csv(path)
    if path.suffix == ".json":
        return _read_json(path)
    return [Record(obj, path, n, _group(obj, path)) for n, obj in read_jsonl(path)]


def _read_csv(path: Path) -> list[Record]:
    out = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                if len(row) != len(CSV_FIELDS):
                    raise BadLine(path, n, f"{len(row)} columns, expected {len(CSV_FIELDS)} "
                                           "(question, A, B, C, D, answer)")
                obj = dict(zip(CSV_FIELDS, row))
                out.append(Record(obj, path, n, _group({}, path)))
    except UnicodeDecodeError:
        raise Llama2Error(f"{path}: not valid UTF-8; convert the file to UTF-8") from None
    except OSError as e:
        raise Llama2Error(f"cannot read {path}: {e.strerror}") from None
    return out


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise Llama2Error(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Llama2Error(f"{path}: not valid JSON ({e}); give a JSON list of objects or a JSONL file") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("examples", "data", "rows") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list):
        raise Llama2Error(f"{path}: expected a JSON list of objects (or an object with an \"examples\" list)")
    out = []
    for i, obj in enumerate(data, 1):  # line = the item's number in the list
        if not isinstance(obj, dict):
            raise BadLine(path, i, "not a JSON object (item number in the list)")
        out.append(Record(obj, path, i, _group(obj, path)))
    return out
