"""Text measures against hand-computed values, and ROUGE-L against Google's rouge-score as an oracle."""

from __future__ import annotations

import random

import pytest

from llama2.eval.text_metrics import (answer_measures, degenerate, distinct_n, lcs_length, longest_loop,
                                      longest_run, mean_measures, pieces, rouge_l, words)


def test_tokens_are_words_and_punctuation():
    assert words("Return self.x, or None!") == ["return", "self", ".", "x", ",", "or", "none", "!"]
    assert words("Ab  cD", lowercase=False) == ["Ab", "cD"]
    assert pieces("a\n\nb.") == ["a", "\n", "\n", "b", "."]


def test_lcs_by_hand():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert lcs_length("", "abc") == 0
    assert lcs_length("abc", "abc") == 3
    assert lcs_length("abc", "def") == 0


def test_rouge_l_by_hand():
    # the cat [sat] on [the] mat / the cat [lay] on [a] mat: LCS "the cat on mat" = 4 of 6 and 6
    r = rouge_l("the cat sat on the mat", "the cat lay on a mat")
    assert r["precision"] == pytest.approx(4 / 6) and r["recall"] == pytest.approx(4 / 6)
    assert r["f1"] == pytest.approx(2 / 3)
    # candidate a b , c . (5 tokens), reference a c: LCS 2 -> P 2/5, R 1, F 2*(2/5)/(7/5) = 4/7
    r = rouge_l("A b, c.", "a c")
    assert (r["precision"], r["recall"]) == (pytest.approx(0.4), pytest.approx(1.0))
    assert r["f1"] == pytest.approx(4 / 7)
    assert rouge_l("x y", "z")["f1"] == 0.0
    assert rouge_l("", "z")["f1"] == 0.0 and rouge_l("z", "")["f1"] == 0.0
    assert rouge_l("Same words.", "same words .")["f1"] == pytest.approx(1.0)


def test_distinct_n_by_hand():
    assert distinct_n("a a b", 1) == pytest.approx(2 / 3)
    assert distinct_n("a a b", 2) == pytest.approx(1.0)  # (a a), (a b)
    assert distinct_n("a b a b a b", 2) == pytest.approx(2 / 5)  # ab ba ab ba ab
    assert distinct_n(["\n"] * 5, 1) == pytest.approx(1 / 5)
    assert distinct_n("one", 2) == 0.0 and distinct_n("", 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n("a", 0)


def test_runs_and_loops_by_hand():
    assert longest_run(["x", "y", "y", "y", "z"]) == (3, "y")
    assert longest_run([]) == (0, None)
    loop = longest_loop(list("abcabcab"))
    assert (loop.start, loop.length, loop.pattern) == (0, 8, ("a", "b", "c"))
    assert loop.copies == pytest.approx(8 / 3)
    loop = longest_loop(list("qxxxxr"))
    assert (loop.start, loop.length, loop.pattern) == (1, 4, ("x",))
    assert longest_loop(list("abcdef")) is None


def test_degenerate_by_hand():
    assert degenerate("\n" * 8 + "x") == "a run of 8 x '\\n'"
    assert degenerate("The value.\n\n\n\n\n\n\n") is None  # 7 newlines: under the run limit of 8
    assert degenerate("   \n ") == "blank" and degenerate("") == "blank"
    assert degenerate("foo bar foo bar foo bar foo bar") == "a loop of 4.0 x 'foo bar' (8 of 8 tokens)"
    # a loop of 8 tokens inside 20 is under half the answer
    assert degenerate("Return the number of items in the list when it is not empty : a b a b a b a b") is None
    assert degenerate("Return the number of items in the list, or None if it is empty.") is None
    # "the given values" comes back once: 1.x copies of a pattern is not a loop
    assert degenerate("Return the list of the given values for the given values.") is None
    # a sentence and its blank line (8 words and marks + 2 newlines = 10 pieces) four times over
    assert degenerate("There are not available in the queue.\n\n" * 4) == \
        "a loop of 4.0 x 'There are not available in the queue . \\n \\n' (40 of 40 tokens)"
    assert degenerate("a b a b a b a b", min_copies=5) is None  # 4 copies


def test_answer_measures():
    m = answer_measures("a a b", reference="a b")
    assert m == {"distinct_1": pytest.approx(2 / 3), "distinct_2": 1.0, "degenerate": 0.0,
                 "rouge_l_f1": pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))}
    assert answer_measures("\n" * 9)["degenerate"] == 1.0
    assert mean_measures([{"x": 1.0}, {"x": 0.0}]) == {"x": 0.5} and mean_measures([]) == {}


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score (the oracle) not installed")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    vocab = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "x1", "y2"]
    for _ in range(300):
        cand = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 20)))
        ref = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 20)))
        want = scorer.score(ref, cand)["rougeL"]  # score(target, prediction)
        got = rouge_l(cand, ref)
        assert got["precision"] == pytest.approx(want.precision)
        assert got["recall"] == pytest.approx(want.recall)
        assert got["f1"] == pytest.approx(want.fmeasure)
