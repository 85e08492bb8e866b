"""The one JSON-lines reader (llama2.data.jsonl): file:line errors, blank lines, skip mode."""

from __future__ import annotations

import re

import pytest

from llama2 import Llama2Error
from llama2.data.jsonl import KEEP_REASONS, BadLine, field_problem, read_jsonl


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_reads_objects_with_line_numbers_and_skips_blank_lines(tmp_path):
    p = _write(tmp_path / "a.jsonl", b'{"text": "one"}\n\n   \n{"text": "two", "n": 2}\r\n{"x": null}')
    assert list(read_jsonl(p)) == [(1, {"text": "one"}), (4, {"text": "two", "n": 2}), (5, {"x": None})]
    seen = []
    assert len(list(read_jsonl(p, progress=seen.append))) == 3
    assert sum(seen) == p.stat().st_size and len(seen) == 5  # every line's bytes, blank ones too


@pytest.mark.parametrize("data, line, reason", [
    (b'{"text": "ok"}\n{"text": "broken"\n', 2, "not valid JSON"),
    (b'{"text": "ok"}\n\n[1, 2]\n', 3, "not a JSON object (got an array)"),
    (b'"just a string"\n', 1, "not a JSON object (got a string)"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "not valid UTF-8"),
])
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, data, line, reason):
    p = _write(tmp_path / "bad.jsonl", data)
    with pytest.raises(BadLine, match=re.escape(f"{p}:{line}: {reason}")) as e:
        list(read_jsonl(p, hint="each line must be an object"))
    assert isinstance(e.value, Llama2Error) and e.value.lineno == line and e.value.path == p
    assert str(e.value).endswith("; each line must be an object")


def test_skip_mode_counts_and_keeps_the_first_reasons(tmp_path):
    lines = [b'{"i": 0}', b"{nope", b"[]", b'{"i": 3}', b"\xff\xfe"] + [b"oops"] * 6 + [b'{"i": 11}']
    p = _write(tmp_path / "m.jsonl", b"\n".join(lines) + b"\n")
    reader = read_jsonl(p, on_bad_line="skip")
    assert [obj["i"] for _, obj in reader] == [0, 3, 11]
    assert reader.skipped == 9 and len(reader.reasons) == KEEP_REASONS
    assert reader.reasons[0].startswith(f"{p}:2: not valid JSON")
    assert reader.reasons[1] == f"{p}:3: not a JSON object (got an array)"
    assert reader.reasons[2].startswith(f"{p}:5: not valid UTF-8")
    summary = reader.summary()
    assert summary.startswith(f"{p}: skipped 9 bad lines (") and summary.endswith(", ...)")
    assert read_jsonl(_write(tmp_path / "ok.jsonl", b"{}\n"), on_bad_line="skip").summary() == ""


def test_callers_report_their_own_checks_the_same_way(tmp_path):
    p = _write(tmp_path / "d.jsonl", b'{"text": "a"}\n{"text": 3}\n{"body": "b"}\n{"text": true}\n')

    def texts(on_bad_line):
        reader = read_jsonl(p, on_bad_line=on_bad_line)
        out = []
        for lineno, obj in reader:
            if problem := field_problem(obj, "text", str, "a string"):
                reader.bad(lineno, problem)
                continue
            out.append(obj["text"])
        return out, reader

    with pytest.raises(BadLine, match=re.escape(f'{p}:2: "text" is a number, not a string')):
        texts("error")
    out, reader = texts("skip")
    assert out == ["a"] and reader.skipped == 3
    assert reader.reasons[1] == f'{p}:3: no "text" field'
    assert field_problem({"n": True}, "n", int, "an integer") == '"n" is a boolean, not an integer'
    assert field_problem({"n": 2}, "n", int, "an integer") is None
    assert field_problem({"x": 2.5}, "x", (int, float), "a number") is None


def test_missing_file_and_bad_mode(tmp_path):
    with pytest.raises(Llama2Error, match="cannot read .*missing.jsonl"):
        list(read_jsonl(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="on_bad_line"):
        read_jsonl(tmp_path / "x.jsonl", on_bad_line="ignore")  # type: ignore[arg-type]


def test_metrics_reader_skips_a_torn_last_line(tmp_path):
    from llama2.train.metrics import read_metrics

    p = _write(tmp_path / "metrics.jsonl", b'{"step": 1, "loss": 2.5}\n\n{"step": 2, "loss": NaN}\n{"step": 3, "lo')
    recs = read_metrics(p)
    assert [r["step"] for r in recs] == [1, 2] and recs[0]["loss"] == 2.5
