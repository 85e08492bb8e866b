"""Scoring generated answers: SQuAD's normalisation, exact match and token F1 (the best over the references),
the final number of a GSM8K-style answer, MATH's \\boxed{...} answer, and majority voting (maj@k)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's token F1 of the normalised words, the best over the references."""
    def f1(pred: str, ref: str) -> float:
        p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
        if not p or not r:
            return float(p == r)
        common = sum((Counter(p) & Counter(r)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(r)
        return 2 * precision * recall / (precision + recall)
    return max((f1(prediction, r) for r in references), default=0.0)


def last_number(text: str) -> str | None:
    """The last number in text, commas and a trailing '.0...' dropped ("1,234.50" -> "1234.5"), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return canonical_number(found[-1])


def canonical_number(s: str) -> str:
    s = s.replace(",", "").strip().rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s.startswith("-") and s[1:] in ("0", ""):
        s = "0"
    return s or "0"


def gsm8k_reference(answer: str) -> str | None:
    """The number after GSM8K's '####' marker (or the last number when there is none)."""
    if "####" in answer:
        return last_number(answer.rsplit("####", 1)[1])
    return last_number(answer)


def boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


def math_answer(text: str) -> str | None:
    """A MATH answer: the last \\boxed{}, else what follows 'answer is', else the last number; spaces and a
    trailing period dropped."""
    found = boxed(text)
    if found is None:
        m = re.search(r"answer is[:\s]*\$?([^\n$]+)", text)
        found = m.group(1) if m else last_number(text)
    if found is None:
        return None
    found = found.strip().rstrip(".").replace(" ", "")
    return canonical_number(found) if _NUMBER.fullmatch(found) else found


def majority(answers: Sequence[str | None]) -> str | None:
    """The most common non-None answer (ties: the first seen), or None."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)
