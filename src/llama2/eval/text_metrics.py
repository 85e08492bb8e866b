"""Text measures a program computes from an answer (and a reference): ROUGE-L F1, distinct-n fractions and a
degenerate-output check.

Tokens are words (runs of letters, digits and underscores) and single punctuation characters, lower-cased, as
`words(text)` gives them; whitespace separates tokens and is not one. The degenerate-output check works on
`pieces(text)`, which also keeps each newline as a token, so "a run of newlines" is visible to it.

    rouge_l("the cat sat on the mat", "the cat lay on a mat")   # {"precision": .., "recall": .., "f1": ..}
    distinct_n("a a b", 1)                                      # 2 distinct / 3 unigrams = 0.667
    degenerate("\\n\\n\\n\\n\\n\\n\\n\\n")                               # "a run of 8 x '\\n'"
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Hashable

_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")
_PIECE = re.compile(r"\n|\w+|[^\w\s]")

# degenerate(): thresholds
MAX_RUN = 8  # this many consecutive copies of one token (or of one short pattern) is a loop
MAX_PERIOD = 16  # patterns up to this many tokens long (a short sentence and its newlines) are looked for
MIN_COPIES = 3  # ... repeated at least this many times
MIN_LOOP_FRACTION = 0.5  # ... covering at least this fraction of the answer's tokens


def words(text: str, lowercase: bool = True) -> list[str]:
    """Word and punctuation tokens: runs of \\w characters and single other non-space characters."""
    return _WORD_OR_PUNCT.findall(text.lower() if lowercase else text)


def pieces(text: str) -> list[str]:
    """Like words() (case kept), plus one token per newline."""
    return _PIECE.findall(text)


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of a and b (dynamic programming, O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-L (Lin 2004) of candidate against reference over words(): precision = LCS / candidate tokens,
    recall = LCS / reference tokens, f1 their harmonic mean (0 when either text has no tokens or LCS is 0)."""
    c, r = words(candidate), words(reference)
    if not c or not r:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    lcs = lcs_length(c, r)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    p, rec = lcs / len(c), lcs / len(r)
    return {"precision": p, "recall": rec, "f1": 2 * p * rec / (p + rec)}


def distinct_n(text: str | Sequence[Hashable], n: int = 1) -> float:
    """Distinct n-grams / all n-grams of the answer (words() of a string, or a token sequence as given);
    0.0 when it has fewer than n tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    toks = words(text) if isinstance(text, str) else list(text)
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def longest_run(tokens: Sequence[Hashable]) -> tuple[int, Hashable | None]:
    """(length, token) of the longest run of one token repeated back to back; (0, None) for no tokens."""
    best, best_tok, run = 0, None, 0
    for i, t in enumerate(tokens):
        run = run + 1 if i and t == tokens[i - 1] else 1
        if run > best:
            best, best_tok = run, t
    return best, best_tok


@dataclass(frozen=True)
class Loop:
    """A stretch of tokens that repeats one pattern: `pattern` (period tokens) `copies` times (the last copy may
    be partial), covering `length` tokens from `start`."""

    start: int
    length: int
    pattern: tuple[Hashable, ...]

    @property
    def copies(self) -> float:
        return self.length / len(self.pattern)


def longest_loop(tokens: Sequence[Hashable], max_period: int = MAX_PERIOD) -> Loop | None:
    """The longest stretch (in tokens) where tokens[i] == tokens[i - p] throughout, for a period p up to
    max_period, counted with its first copy; the shortest period wins a tie. None if nothing repeats."""
    best: Loop | None = None
    n = len(tokens)
    for p in range(1, max_period + 1):
        run = 0
        for i in range(p, n + 1):
            if i < n and tokens[i] == tokens[i - p]:
                run += 1
                continue
            if run > 0:
                length = run + p
                start = i - length
                if best is None or length > best.length:
                    best = Loop(start, length, tuple(tokens[start:start + p]))
            run = 0
    return best


def degenerate(text: str, max_run: int = MAX_RUN, max_period: int = MAX_PERIOD, min_copies: float = MIN_COPIES,
               min_fraction: float = MIN_LOOP_FRACTION) -> str | None:
    """Why an answer is degenerate, or None: it is blank; or one token (a newline counts) repeats back to back
    `max_run` times or more; or a pattern of 2 to `max_period` tokens repeats back to back `min_copies` times or
    more over at least `max_run` tokens and at least `min_fraction` of the answer (over pieces())."""
    toks = pieces(text)
    if not toks or not text.strip():
        return "blank"
    run, tok = longest_run(toks)
    if run >= max_run:
        return f"a run of {run} x {tok!r}"
    loop = longest_loop(toks, max_period)
    if loop is not None and len(loop.pattern) > 1 and loop.copies >= min_copies and loop.length >= max_run and \
            loop.length >= min_fraction * len(toks):
        pattern = " ".join(map(str, loop.pattern))
        return f"a loop of {loop.copies:.1f} x {pattern!r} ({loop.length} of {len(toks)} tokens)"
    return None


def answer_measures(answer: str, reference: str | None = None) -> dict[str, float]:
    """distinct-1, distinct-2, degenerate (1.0 or 0.0), and rouge_l_f1 when a reference is given."""
    out = {"distinct_1": distinct_n(answer, 1), "distinct_2": distinct_n(answer, 2),
           "degenerate": 1.0 if degenerate(answer) else 0.0}
    if reference is not None:
        out["rouge_l_f1"] = rouge_l(answer, reference)["f1"]
    return out


def mean_measures(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each key over rows (keys of the first row)."""
    if not rows:
        return {}
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
