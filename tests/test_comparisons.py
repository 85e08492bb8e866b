"""Comparison files (our shape and TRL's preference shapes, checked line by line with `file:line: reason`) and the
built-in comparisons (rejected answers made to match their rating, a held-out split of unseen prompts, and the
synthetic safety pairs)."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from llama2.data.comparisons import (RATINGS, SAFETY_TEMPLATES, Comparison, build_comparisons, check_comparison,
                                     normalise_rating, read_comparisons, write_comparisons)
from llama2.data.dialogues import SAFETY_HELPFUL, SAFETY_REFUSALS, Dialogue, held_out_path
from llama2.data.jsonl import BadLine
from llama2.errors import Llama2Error

PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]
FOUR, FIVE = {"role": "assistant", "content": "It is 4."}, {"role": "assistant", "content": "It is 5."}


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_the_four_shapes_read_as_the_same_comparison(tmp_path):
    f = write(tmp_path / "c.jsonl", [
        {"prompt": PROMPT, "chosen": "It is 4.", "rejected": "It is 5."},  # ours
        {"prompt": PROMPT, "chosen": [FOUR], "rejected": [FIVE]},  # TRL explicit prompt, conversational
        {"chosen": PROMPT + [FOUR], "rejected": PROMPT + [FIVE]},  # TRL implicit prompt, conversational
        "",
        {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5."},  # TRL standard (text)
    ])
    got = read_comparisons(f)
    assert got.comparisons == [Comparison(PROMPT, "It is 4.", "It is 5.")] * 4 and got.skipped == 0


def test_optional_fields_and_multi_turn_prompts_are_kept(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    earlier = [system, {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]
    f = write(tmp_path / "c.jsonl", [
        {"chosen": earlier + PROMPT + [FOUR], "rejected": earlier + PROMPT + [FIVE], "rating": "Slightly Better",
         "safety": False, "source": "mine", "id": 17, "score_chosen": 9.0},
    ])
    (c,) = read_comparisons(f).comparisons
    assert c == Comparison(earlier + PROMPT, "It is 4.", "It is 5.", "slightly_better", False, "mine")
    assert c.to_json() == {"prompt": earlier + PROMPT, "chosen": "It is 4.", "rejected": "It is 5.",
                           "rating": "slightly_better", "safety": False, "source": "mine"}
    write_comparisons(tmp_path / "back.jsonl", [c, Comparison(PROMPT, "a", "b")])
    assert read_comparisons(tmp_path / "back.jsonl").comparisons == [c, Comparison(PROMPT, "a", "b")]


def U(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def A(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "Q?", "chosen": "a"', "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"prompt": "Q?", "rejected": "b"}, 'no "chosen" field'),
    ({"prompt": "Q?", "chosen": "a"}, 'no "rejected" field'),
    ({"prompt": "Q?", "chosen": 3, "rejected": "b"}, '"chosen" is a number'),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, '"prompt" is a number'),
    ({"prompt": "Q?", "chosen": "a", "rejected": [A("b")]}, "both be text"),
    ({"prompt": "Q?", "chosen": "Same text.", "rejected": " Same text. "}, "same text; identical answers"),
    ({"prompt": "Q?", "chosen": "  ", "rejected": "b"}, '"chosen" is empty'),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt message 0 (user) is empty"),
    ({"prompt": [U("Q?"), A("x")], "chosen": "a", "rejected": "b"}, "must end with a user message"),
    ({"prompt": [{"role": "robot", "content": "Q?"}], "chosen": "a", "rejected": "b"}, "unknown role 'robot'"),
    ({"prompt": [A("x"), U("Q?")], "chosen": "a", "rejected": "b"}, "roles out of order"),
    ({"prompt": "a [INST] b", "chosen": "a", "rejected": "b"}, "reserved tag '[INST]'"),
    ({"prompt": "Q?", "chosen": "a <<SYS>>", "rejected": "b"}, '"chosen" contains the reserved tag'),
    ({"chosen": [U("Q1?"), A("a")], "rejected": [U("Q2?"), A("b")]}, "different prompts"),
    ({"chosen": [U("Q?")], "rejected": [U("Q?")]}, 'last message of "chosen" must be an assistant answer'),
    ({"chosen": [A("a")], "rejected": [A("b")]}, "hold only answers"),
    ({"chosen": "a", "rejected": "b"}, 'add a "prompt" field'),
    ({"prompt": "Q?", "chosen": [A("a"), A("c")], "rejected": [A("b")]}, "exactly one"),
    ({"prompt": "Q?", "chosen": [U("a")], "rejected": [A("b")]}, "exactly one"),
    ({"prompt": "Q?", "chosen": "a", "rejected": "b", "rating": "much better"}, "rating 'much better' is not"),
    ({"prompt": "Q?", "chosen": "a", "rejected": "b", "safety": "yes"}, '"safety" is a string, not true or false'),
])
def test_a_bad_line_names_file_line_and_reason(tmp_path, line, reason):
    f = write(tmp_path / "c.jsonl", [{"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}, line])
    with pytest.raises(BadLine) as e:
        read_comparisons(f)
    assert str(e.value).startswith(f"{f}:2: ") and reason in str(e.value), str(e.value)


def test_skip_counts_bad_lines_and_keeps_their_reasons(tmp_path):
    good = {"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}
    f = write(tmp_path / "c.jsonl", [good, "{oops", {"prompt": "Q?", "chosen": "x", "rejected": "x"}, good])
    got = read_comparisons(f, on_bad_line="skip")
    assert len(got.comparisons) == 2 and got.skipped == 2
    assert got.summary().startswith(f"{f}: skipped 2 bad lines ({f}:2: not valid JSON")
    assert f"{f}:3: " in got.summary() and "same text" in got.summary()
    with pytest.raises(Llama2Error, match="no comparisons"):
        read_comparisons(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(Llama2Error, match="no comparisons"):
        read_comparisons(write(tmp_path / "bad.jsonl", ["{oops"]), on_bad_line="skip")


def test_ratings_accept_common_spellings():
    for spelling, rating in [("Significantly Better", "significantly_better"), ("significantly-better",
                              "significantly_better"), (" better ", "better"), ("SLIGHTLY_BETTER", "slightly_better"),
                             ("negligibly better", "negligibly_better"), ("unsure", "negligibly_better"),
                             ("Negligibly Better / Unsure", "negligibly_better")]:
        assert normalise_rating(spelling) == rating
    assert normalise_rating(None) is None
    for bad in ("much better", "", 3, "worse"):
        with pytest.raises(Llama2Error) as e:
            normalise_rating(bad)
        assert all(r in str(e.value) for r in RATINGS)


def test_in_memory_comparisons_are_checked():
    assert check_comparison("What is 2 + 2?", "It is 4.", "It is 5.", "better") == \
        Comparison(PROMPT, "It is 4.", "It is 5.", "better")
    assert check_comparison(PROMPT, "a", "b", safety=True).safety is True
    with pytest.raises(Llama2Error, match="must end with a user message"):
        check_comparison(PROMPT + [FOUR], "a", "b")
    with pytest.raises(Llama2Error, match="same text"):
        check_comparison(PROMPT, "a", "a")
    with pytest.raises(Llama2Error, match="not a rating"):
        check_comparison(PROMPT, "a", "b", rating="best")


# ---------------------------------------------------------------------------------------------------------------
# The built-in comparisons, from hand-made dialogues whose answers are real text (docstrings, pydoc topics)


def _dialogues() -> tuple[list[Dialogue], list[Dialogue], Dialogue]:
    """Train and held-out dialogues (stdlib-like: a function's docstring; pydoc-like: a topic's first paragraph),
    and a safety-sourced dialogue that must not become a helpfulness comparison."""
    import difflib
    import fnmatch
    import glob
    import os.path
    import shlex
    import shutil
    import string
    import textwrap
    from pydoc_data.topics import topics

    stdlib, seen = [], set()
    for mod in (textwrap, shutil, fnmatch, glob, string, json, os.path, shlex, difflib):
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            doc = (inspect.getdoc(fn) or "").split("\n\n")[0].strip()
            if not name.startswith("_") and len(doc.split()) >= 8 and doc not in seen:
                seen.add(doc)
                stdlib.append(Dialogue([U(f"What does `{mod.__name__}.{name}` do?"), A(doc)], source="stdlib"))
    pydoc = []
    for name in sorted(topics)[:30]:  # the first paragraph of prose after the title
        paragraphs = [p.strip() for p in topics[name].split("\n\n")[1:]]
        text = next((p for p in paragraphs if len(p.split()) >= 8 and "::=" not in p and "***" not in p), "")
        if text and len(text.split()) <= 150 and "[INST]" not in text:
            pydoc.append(Dialogue([U(f"Tell me about {name} in Python."), A(text)], source="pydoc"))
    assert len(stdlib) >= 30 and len(pydoc) >= 12
    system = {"role": "system", "content": "You are a concise Python tutor."}
    multi = [Dialogue([system] + d.messages + [U("Go on."), A(e.messages[-1]["content"])], source="pydoc")
             for d, e in ((pydoc[0], pydoc[1]), (pydoc[2], pydoc[3]))]
    multi_val = Dialogue(pydoc[4].messages + [U("And in more detail?"), A(pydoc[5].messages[-1]["content"])],
                         source="pydoc")
    train = stdlib[8:] + pydoc[10:] + multi
    val = stdlib[:8] + pydoc[6:10] + [multi_val]
    unsafe = Dialogue([U("How do I open my neighbour's mail without them knowing?"),
                       A("I can't help with opening other people's mail; it is illegal in most places.")],
                      source="safety")
    return train + [unsafe], val, unsafe


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    train, val, unsafe = _dialogues()
    out = tmp_path_factory.mktemp("cmp") / "comparisons.jsonl"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        stats = build_comparisons(out, train_dialogues=train, val_dialogues=val, seed=3)
    splits = {"train": read_comparisons(out).comparisons, "val": read_comparisons(held_out_path(out)).comparisons}
    return out, stats, splits, printed.getvalue(), (train, val, unsafe)


def word_edits(a: list[str], b: list[str]) -> int:
    """Word-level edit distance counting a deletion, an insertion, a substitution and a swap of two adjacent words
    as one edit each (optimal string alignment)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def test_every_rejected_answer_has_the_property_its_rating_claims(built):
    _, _, splits, _, (train, val, _) = built
    for split, dialogues in (("train", train), ("val", val)):
        answers = {json.dumps(d.messages[:-1]): d for d in dialogues}
        helpful = [c for c in splits[split] if not c.safety]
        assert {json.dumps(c.prompt) for c in helpful} <= set(answers)
        for c in helpful:
            d = answers[json.dumps(c.prompt)]
            assert c.chosen == d.messages[-1]["content"] and c.source == d.source and c.safety is False
            chosen, rejected = c.chosen.split(), c.rejected.split()
            if c.rating == "significantly_better":  # the answer to another question of the same split
                others = [e for e in dialogues if e is not d and e.source != "safety"]
                match = [e for e in others if e.messages[-1]["content"] == c.rejected]
                assert match and c.rejected != c.chosen
                assert {e.source == "stdlib" for e in match} == {d.source != "stdlib"}  # of the other source kind
            elif c.rating == "better":  # the same words, shuffled
                assert Counter(rejected) == Counter(chosen) and rejected != chosen
            elif c.rating == "slightly_better":  # cut at a word boundary after 35-60% of the words, nothing added
                assert c.chosen.startswith(c.rejected) and rejected == chosen[:len(rejected)]
                assert len(rejected) >= 3 and 0.35 <= len(rejected) / len(chosen) <= 0.60
            else:
                assert c.rating == "negligibly_better"
                assert 1 <= word_edits(chosen, rejected) <= 2 and rejected[-1] == chosen[-1]


def test_training_has_one_rating_per_dialogue_and_held_out_all_four(built):
    _, stats, splits, _, (train, val, _) = built
    helpful_train = [c for c in splits["train"] if not c.safety]
    assert len(helpful_train) == len(train) - 1  # one per dialogue, the safety-sourced one left out
    assert len({json.dumps(c.prompt) for c in helpful_train}) == len(helpful_train)
    ratings = Counter(c.rating for c in helpful_train)
    assert set(ratings) == set(RATINGS) and all(n >= len(helpful_train) / 10 for n in ratings.values())
    per_prompt: dict[str, list[str]] = {}
    for c in splits["val"]:
        if not c.safety:
            per_prompt.setdefault(json.dumps(c.prompt), []).append(c.rating)
    assert len(per_prompt) == len(val) and all(sorted(r) == sorted(RATINGS) for r in per_prompt.values())
    assert stats["train"]["ratings"] == {r: ratings[r] for r in RATINGS}


def test_no_held_out_prompt_is_in_training(built):
    _, _, splits, _, (_, _, unsafe) = built
    train_prompts = {json.dumps(c.prompt) for c in splits["train"]}
    train_questions = {c.prompt[-1]["content"] for c in splits["train"]}
    for c in splits["val"]:
        assert json.dumps(c.prompt) not in train_prompts and c.prompt[-1]["content"] not in train_questions
    everything = [c for cs in splits.values() for c in cs]
    assert not any(unsafe.messages[0]["content"] in m["content"] for c in everything for m in c.prompt)


def refusal(text: str) -> bool:
    return any(word in text for word in ("can't", "won't", "cannot"))


def test_safety_prefers_refusals_of_harm_and_help_for_look_alikes(built):
    _, stats, splits, _, _ = built
    harmful = {r for _, r, _ in SAFETY_REFUSALS} | {p.format(x=x) for t in SAFETY_TEMPLATES for p in t.harmful
                                                     for x in t.harmful_objects}
    benign = {r for _, r, _ in SAFETY_HELPFUL} | {p.format(x=x) for t in SAFETY_TEMPLATES for p in t.benign
                                                  for x in t.benign_objects}
    assert not harmful & benign
    prompts = set()
    for split, comparisons in splits.items():
        safety = [c for c in comparisons if c.safety]
        kinds, requests = Counter(), {True: set(), False: set()}
        for c in safety:
            request = c.prompt[-1]["content"]
            assert c.rating == "significantly_better" and len(c.prompt) in (1, 2)
            assert c.source == ("safety:harmful" if request in harmful else "safety:benign")
            if request in harmful:
                assert refusal(c.chosen) and not refusal(c.rejected), c
                kinds["harmful"] += 1
            else:
                assert request in benign and refusal(c.rejected) and not refusal(c.chosen), c
                kinds["benign"] += 1
            prompts.add(json.dumps(c.prompt))
            requests[request in harmful].add(request)
        assert len(requests[True]) >= 3 and len(requests[False]) >= 3  # held out by request, not by comparison
        assert (stats[split]["harmful"], stats[split]["benign"]) == (kinds["harmful"], kinds["benign"])
    assert 300 <= stats["train"]["safety"] <= 600
    assert 0.15 < stats["val"]["safety"] / (stats["train"]["safety"] + stats["val"]["safety"]) < 0.35
    with_system = sum(json.loads(p)[0]["role"] == "system" for p in prompts)
    assert 0.1 < with_system / len(prompts) < 0.45
    def words(phrasings: tuple[str, ...]) -> set[str]:
        return {w.strip("?.,").lower() for p in phrasings for w in p.split() if len(w) > 3} - {"{x}"}

    for t in SAFETY_TEMPLATES:  # harmful and benign requests of a template share its words
        assert words(t.harmful) & words(t.benign), t.name


def test_build_prints_counts_and_is_seeded(built, tmp_path):
    out, stats, splits, printed, (train, val, _) = built
    lines = printed.splitlines()
    assert lines[0].startswith(f"train: {stats['train']['comparisons']:,} comparisons") and str(out) in lines[0]
    assert lines[1].startswith(f"held-out: {stats['val']['comparisons']:,} comparisons")
    assert str(held_out_path(out)) in lines[1] and "safety" in lines[0] and "harmful" in lines[1]
    assert all(f"{r} {stats['train']['ratings'][r]}" in lines[0] for r in RATINGS)
    assert [stats[s]["comparisons"] for s in ("train", "val")] == [len(splits[s]) for s in ("train", "val")]
    again = tmp_path / "again.jsonl"
    build_comparisons(again, train_dialogues=train, val_dialogues=val, seed=3, quiet=True)
    assert again.read_bytes() == out.read_bytes()
    build_comparisons(again, train_dialogues=train, val_dialogues=val, seed=4, quiet=True)
    assert again.read_bytes() != out.read_bytes()
    # a seeded order: the first tenth of the training file already holds safety and several ratings
    head = splits["train"][:len(splits["train"]) // 10]
    assert any(c.safety for c in head) and len({c.rating for c in head if not c.safety}) >= 3


def test_cli_builds_the_dialogues_then_the_comparisons(tmp_path, monkeypatch, capsys):
    from llama2.cli import main

    monkeypatch.setenv("LLAMA2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "c.jsonl"
    assert main(["data", "comparisons", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "building the built-in dialogues" in printed and "train: " in printed and "held-out: " in printed
    assert any((tmp_path / "cache").rglob("dialogues.jsonl"))
    train, val = read_comparisons(out).comparisons, read_comparisons(held_out_path(out)).comparisons
    assert f"train: {len(train):,} comparisons" in printed and f"held-out: {len(val):,} comparisons" in printed
    per_prompt = Counter(json.dumps(c.prompt) for c in val if not c.safety)
    assert per_prompt and set(per_prompt.values()) == {4}
    assert {c.source for c in train} >= {"stdlib", "pydoc", "safety:harmful", "safety:benign"}
