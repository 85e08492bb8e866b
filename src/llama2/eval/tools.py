"""Tool use measured (the paper's Table 15): each problem answered without tools and with them, greedy, through
the one generation path (the engine runs the calls), and marked by its number: the last number of the final answer
(what follows the last tool result) against the gold value, exactly. Also how often a call was made and how many
calls were well formed (JSON naming an offered tool with arguments that fit it).

Problems come from the built-in world's held-out tool questions (`tools-gold.val.jsonl`: calculation, lookup) or
from local files of the usual math word-problem sets: ASDiv (its XML, or JSON/JSONL with Body/Question/Answer),
SVAMP (JSON with Body, Question, Answer) and MAWPS (JSON/JSONL with sQuestion and lSolutions)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..chat import encode_dialog
from ..data.jsonl import read_jsonl
from ..data.world import data_path
from ..errors import Llama2Error
from ..inference.generate import Generator, SamplingParams
from ..tools import Toolbox, final_answer
from .gold import wilson

FORMATS = ("asdiv", "svamp", "mawps")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # the gold number, as text
    family: str = "math"
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.messages:
            self.messages = [{"role": "user", "content": self.question}]


def as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def number_correct(answer: str, gold: str) -> bool:
    """Whether the last number of `answer` equals `gold` (commas ignored; decimals to 1e-6 of the gold value)."""
    found = _NUMBER.findall(answer)
    want = as_number(gold)
    got = as_number(found[-1].rstrip(".")) if found else None
    if want is None or got is None:
        return False
    return abs(got - want) <= Fraction(1, 10 ** 6) * max(1, abs(want))


# ------------------------------------------------------------------------------------------------- problem files


def read_problems(path: Path | str, fmt: str) -> tuple[list[Problem], int]:
    """(the problems of a local ASDiv / SVAMP / MAWPS file with a numeric answer, how many were left out for a
    non-numeric one); Llama2Error for an unknown format or a file of another shape."""
    if fmt not in FORMATS:
        raise Llama2Error(f"unknown problem format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise Llama2Error(f"{path}: no such file")
    if fmt == "asdiv" and path.suffix.lower() == ".xml":
        rows = _asdiv_xml(path)
    else:
        rows = _json_rows(path)
    out, skipped = [], 0
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise Llama2Error(f"{path}: item {i} is not an object")
        q, a = _fields(row, fmt, path, i)
        number = _leading_number(a)
        if number is None:
            skipped += 1
            continue
        pid = str(row.get("ID", row.get("iIndex", row.get("id", i))))
        out.append(Problem(f"{fmt}:{pid}", q, number, fmt))
    if not out:
        raise Llama2Error(f"{path}: no problem with a numeric answer in {fmt} shape")
    return out, skipped


def _json_rows(path: Path) -> list[Any]:
    text = path.read_text(errors="replace").lstrip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise Llama2Error(f"{path}: not valid JSON ({e})") from None
    return [obj for _, obj in read_jsonl(path)]


def _asdiv_xml(path: Path) -> list[dict[str, Any]]:
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as e:
        raise Llama2Error(f"{path}: not valid XML ({e})") from None
    return [{"ID": p.get("ID"), "Body": p.findtext("Body", ""), "Question": p.findtext("Question", ""),
             "Answer": p.findtext("Answer", "")} for p in root.iter("Problem")]


def _fields(row: dict[str, Any], fmt: str, path: Path, i: int) -> tuple[str, str]:
    if fmt in ("asdiv", "svamp"):
        if "Question" not in row or "Answer" not in row:
            raise Llama2Error(f"{path}: item {i} has no Question/Answer ({fmt} files hold Body, Question, Answer)")
        question = f"{str(row.get('Body', '')).strip()} {str(row['Question']).strip()}".strip()
        return question, str(row["Answer"])
    if "sQuestion" not in row or "lSolutions" not in row:
        raise Llama2Error(f"{path}: item {i} has no sQuestion/lSolutions (the MAWPS shape)")
    sols = row["lSolutions"]
    return str(row["sQuestion"]).strip(), str(sols[0] if isinstance(sols, list) and sols else sols)


def _leading_number(text: str) -> str | None:
    """An answer's number: '9 (apples)' -> '9'; '3.5' -> '3.5'; 'yes' or '3:4' -> None."""
    m = re.match(r"\s*(-?\d[\d,]*(?:\.\d+)?)\s*(?:\(.*\))?\s*$", text)
    if m is None or as_number(m.group(1)) is None:
        return None
    v = as_number(m.group(1))
    return str(v.numerator) if v.denominator == 1 else m.group(1).replace(",", "")


def world_problems(per_family: int) -> list[Problem]:
    """The first `per_family` held-out questions of each of the built-in world's tool families (calculation,
    lookup): the same draw for every model."""
    rows = [obj for _, obj in read_jsonl(data_path("builtin:world/tools-gold.val.jsonl"))]
    out = []
    for family in sorted({r["family"] for r in rows}):
        out += [Problem(r["id"], r["messages"][-1]["content"], r["gold"], family, r["messages"])
                for r in rows if r["family"] == family][:per_family]
    return out


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class ToolRun:
    """Every problem's answers without and with tools, and what the calls were."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, family: str | None = None) -> dict[str, Any]:
        rows = [r for r in self.rows if family is None or r["family"] == family]
        n = len(rows)
        out: dict[str, Any] = {"n": n}
        for mode in ("without", "with"):
            k = sum(r[mode]["correct"] for r in rows)
            out[mode] = {"accuracy": k / n if n else 0.0, "ci95": wilson(k, n)}
        calls = [c for r in rows for c in r["with"]["calls"]]
        out["answers_with_a_call"] = sum(bool(r["with"]["calls"]) for r in rows) / n if n else 0.0
        out["calls"] = len(calls)
        out["well_formed"] = sum(not c["malformed"] for c in calls) / len(calls) if calls else None
        return out

    def by_family(self) -> dict[str, dict[str, Any]]:
        return {f: self.summary(f) for f in sorted({r["family"] for r in self.rows})}


def tool_eval(model: Any, tokenizer: Any, problems: list[Problem], toolbox: Toolbox, *, max_new_tokens: int = 160,
              batch_size: int = 32, quiet: bool = True) -> ToolRun:
    """Each problem answered greedily without tools (a plain prompt) and with them (the tools listed in the system
    message, the engine running the calls), and marked against its gold number."""
    if not toolbox:
        raise Llama2Error("the tool evaluation needs at least one tool")
    context = model.config.max_seq_len
    gen = Generator(model, tokenizer, max_batch_size=min(batch_size, max(1, len(problems))))
    run = ToolRun()
    answers: dict[str, list[Any]] = {}
    for mode in ("without", "with"):
        ids = [encode_dialog(tokenizer, p.messages, tools=toolbox.specs if mode == "with" else None)
               for p in problems]
        params = [SamplingParams(temperature=0.0, max_new_tokens=max(1, min(max_new_tokens, context - len(i))),
                                 tools=toolbox if mode == "with" else None, truncate=True) for i in ids]
        out = []
        with tqdm(total=len(ids), unit="problem", desc=f"{mode} tools", disable=quiet, dynamic_ncols=True) as bar:
            for lo in range(0, len(ids), batch_size):
                with torch.no_grad():
                    out += gen.generate(ids[lo:lo + batch_size], params[lo:lo + batch_size])
                bar.update(len(ids[lo:lo + batch_size]))
        answers[mode] = out
    for p, plain, tooled in zip(problems, answers["without"], answers["with"]):
        final = final_answer(tooled.text)
        run.rows.append({
            "id": p.id, "family": p.family, "question": p.question, "gold": p.answer,
            "without": {"answer": plain.text.strip(), "correct": number_correct(final_answer(plain.text), p.answer)},
            "with": {"answer": tooled.text.strip(), "final": final, "correct": number_correct(final, p.answer),
                     "calls": [{"name": c.name, "arguments": c.arguments, "result": c.result, "error": c.error,
                                "malformed": c.malformed} for c in tooled.tool_calls]}})
    return run
