"""Dialogue files (the three common chat shapes, checked line by line with `file:line: reason`) and the built-in
instruction dialogues (answers are the real docstrings / topics, held out by source document)."""

from __future__ import annotations

import ast
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from llama2.data.dialogues import (SAFETY_HELPFUL, SAFETY_REFUSALS, build_dialogues, check_dialogue, held_out_path,
                                   read_dialogues)
from llama2.errors import Llama2Error

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}]


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_the_three_shapes_read_as_the_same_dialogue(tmp_path):
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                                  {"from": "gpt", "value": "Hello."}], "id": 7}
    f = write(tmp_path / "d.jsonl", [{"messages": MESSAGES}, MESSAGES, sharegpt, "",
                                     {"messages": MESSAGES, "mask": "last_assistant"}])
    got = read_dialogues(f)
    assert [d.messages for d in got.dialogues] == [MESSAGES] * 4
    assert [d.mask for d in got.dialogues] == [None, None, None, "last_assistant"]
    assert got.skipped == 0


@pytest.mark.parametrize("line, reason", [
    ('{"messages": [', "not valid JSON"),
    ({"text": "hello"}, 'no "messages" (or "conversations") field'),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "roles out of order"),
    ({"messages": [{"role": "user", "content": "x"}]}, "must end with an assistant message"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "is empty"),
    ({"messages": [{"role": "user", "content": "a [INST] b"}, {"role": "assistant", "content": "x"}]},
     "reserved tag '[INST]'"),
    ({"messages": [{"role": "user", "content": "<<SYS>>"}, {"role": "assistant", "content": "x"}]}, "<<SYS>>"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "is from 'alien'"),
    ({"messages": MESSAGES, "mask": "first"}, '"mask" is'),
    ("17", "got a number"),
])
def test_a_bad_line_names_file_line_and_reason(tmp_path, line, reason):
    f = write(tmp_path / "d.jsonl", [{"messages": MESSAGES}, line])
    with pytest.raises(Llama2Error) as e:
        read_dialogues(f)
    assert str(e.value).startswith(f"{f}:2: ") and reason in str(e.value)


def test_skip_counts_bad_lines_and_keeps_their_reasons(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"messages": MESSAGES}, "{oops", {"messages": []}, MESSAGES])
    got = read_dialogues(f, on_bad_line="skip")
    assert len(got.dialogues) == 2 and got.skipped == 2
    assert got.summary().startswith(f"{f}: skipped 2 bad lines ({f}:2: not valid JSON")
    assert f"{f}:3: dialogue is empty" in got.summary()
    with pytest.raises(Llama2Error, match="no dialogues"):
        read_dialogues(write(tmp_path / "bad.jsonl", ["{oops"]), on_bad_line="skip")


def test_in_memory_dialogues_are_checked():
    assert check_dialogue(MESSAGES).messages == MESSAGES
    with pytest.raises(Llama2Error, match="roles out of order"):
        check_dialogue(MESSAGES[::-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict, Path]:
    """The built-in dialogues over two standard-library packages (json, email) to stay fast."""
    root = tmp_path_factory.mktemp("stdlib")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("json", "email", "http"):
        shutil.copytree(stdlib / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("out") / "dialogues.jsonl"
    stats = build_dialogues(out, safety=True, val_fraction=0.2, stdlib_root=root, quiet=True)
    return out, stats, root


def test_builtin_answers_are_the_real_docstrings_and_topics(built):
    from pydoc_data.topics import topics

    out, stats, _ = built
    dialogues = read_dialogues(out).dialogues + read_dialogues(held_out_path(out)).dialogues
    by_source = {}
    for d in dialogues:
        by_source.setdefault(d.source, []).append(d)
    assert set(by_source) >= {"stdlib", "pydoc", "safety"}
    # the oracle: json.dumps's docstring read here with ast, its first paragraph is the answer
    tree = ast.parse((Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py").read_text())
    doc = next(ast.get_docstring(n) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "dumps")
    asked = [d for d in by_source["stdlib"] if "`json.dumps" in d.messages[-2]["content"]
             or (d.messages[-2]["content"].endswith("`json.dumps`?"))]
    assert asked, "json.dumps is asked about"
    answer = next(m["content"] for d in asked for i, m in enumerate(d.messages)
                  if m["role"] == "assistant" and "json.dumps" in d.messages[i - 1]["content"])
    assert doc.startswith(answer.split("\n\n")[0])
    for d in by_source["pydoc"]:  # every answer's first paragraph is text of a pydoc topic
        for m in d.messages:
            if m["role"] == "assistant":
                assert any(m["content"].split("\n\n")[0] in text for text in topics.values())
    multi = [d for d in dialogues if sum(m["role"] == "user" for m in d.messages) > 1]
    systems = [d for d in dialogues if d.messages[0]["role"] == "system"]
    assert multi and systems
    counts = stats["sources"]
    assert sum(c["single_turn"] + c["multi_turn"] for c in counts.values()) == stats["train"] + stats["val"]


def test_builtin_split_is_by_source_document(built):
    """No module of the standard library gives dialogues to both splits (modules named here from the file paths)."""
    out, stats, root = built
    modules = sorted((".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                      for f in root.rglob("*.py")), key=len, reverse=True)
    seen: dict[str, set[str]] = {}
    for split, path in (("train", out), ("val", held_out_path(out))):
        for d in read_dialogues(path).dialogues:
            if d.source != "stdlib":
                continue
            first = next(m["content"] for m in d.messages if m["role"] == "user")
            name = first.split("`")[1].split("(")[0]
            module = next(m for m in modules if name.startswith(m + "."))
            seen.setdefault(module, set()).add(split)
    assert len(seen) > 5 and all(len(splits) == 1 for splits in seen.values())
    assert {"train", "val"} == set().union(*seen.values())
    assert held_out_path(out).name == "dialogues.val.jsonl"


def test_safety_set_has_refusals_and_benign_look_alikes(built):
    out, _, _ = built
    safety = [d for p in (out, held_out_path(out)) for d in read_dialogues(p).dialogues if d.source == "safety"]
    assert len(safety) == len(SAFETY_REFUSALS) + len(SAFETY_HELPFUL)
    categories = {c for c, _, _ in SAFETY_REFUSALS}
    assert len(categories) >= 6 and {c for c, _, _ in SAFETY_HELPFUL} <= categories
    refusals = {r for _, r, _ in SAFETY_REFUSALS}
    for d in safety:
        answer = d.messages[-1]["content"]
        if d.messages[-2]["content"] in refusals:
            assert any(w in answer for w in ("can't", "won't", "cannot"))
        else:
            assert "can't" not in answer and "won't" not in answer


def test_cli_builds_and_prints_counts(tmp_path, capsys):
    from llama2.cli import main

    root = tmp_path / "stdlib"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", root / "json")
    assert main(["data", "dialogues", "--output", str(tmp_path / "d.jsonl"), "--stdlib-root", str(root),
                 "--val-fraction", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "stdlib:" in out and "pydoc:" in out and "single-turn" in out and "held-out" in out
    assert (tmp_path / "d.jsonl").is_file() and (tmp_path / "d.val.jsonl").is_file()
    assert "safety" not in out
