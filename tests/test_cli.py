"""The `llama2` command as a whole: every verb registers, help is light, errors are one line."""

from __future__ import annotations

import subprocess
import sys


def test_parser_registers_verbs_without_importing_torch():
    code = ("import sys; from llama2.cli import build_parser; p = build_parser(); "
            "print(sorted(p._subparsers._group_actions[0].choices)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    verbs = eval(out[0])
    for verb in ("convert", "tokenizer", "generate", "chat", "data", "pretrain", "plot"):
        assert verb in verbs
    assert out[1] == "False"


def test_user_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llama2", "generate", str(tmp_path / "nope"), "--prompt", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llama2: error:") and "nope" in lines[0]
