"""Instructions for Ghost Attention and its evaluation: families of system instructions, each with a text and a
shortened form, and, for the checkable families, a checker (does an answer follow it?) and an enforcer.

The paper's families (hobby "You enjoy ...", language "Speak in ...", public figure "Act as ...") have no checker.
The checkable ones a program can verify: upper case, end every answer with a word, at most N words, always mention
a word, start with a phrase. `register_family` adds a user family.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import Llama2Error

@dataclass
class Instruction:
    """One instruction: its family, its text (and a shortened form), and, for checkable families, a checker
    (answer -> passes) and an enforcer (answer -> an answer that passes)."""

    family: str
    text: str
    short: str
    check: Callable[[str], bool] | None = None
    enforce: Callable[[str], str] | None = None


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def upper_case() -> Instruction:
    def check(a: str) -> bool:
        letters = [c for c in a if c.isalpha()]
        return bool(letters) and all(c.isupper() for c in letters)

    return Instruction("upper_case", "Answer in capital letters only.", "Use capital letters.", check,
                       lambda a: a.upper())


def end_with(word: str) -> Instruction:
    def check(a: str) -> bool:
        w = _words(a)
        return bool(w) and w[-1].lower() == word.lower()

    return Instruction("end_with", f"End every answer with the word: {word}", f"End with: {word}", check,
                       lambda a: a.rstrip() + f" {word}")


def at_most(n: int) -> Instruction:
    return Instruction("at_most_words", f"Answer in at most {n} words.", f"At most {n} words.",
                       lambda a: 0 < len(a.split()) <= n, lambda a: " ".join(a.split()[:n]))


def mention(word: str) -> Instruction:
    return Instruction("mention", f"Always mention the word: {word}", f"Mention: {word}",
                       lambda a: word.lower() in (w.lower() for w in _words(a)), lambda a: f"{word}: {a}")


def start_with(phrase: str) -> Instruction:
    return Instruction("start_with", f"Start every answer with '{phrase}'.", f"Start with '{phrase}'.",
                       lambda a: a.strip().lower().startswith(phrase.lower()), lambda a: f"{phrase} {a}")


HOBBIES = ("tennis", "chess", "gardening", "painting", "hiking")
LANGUAGES = ("French", "Spanish", "Italian", "German")
FIGURES = ("Napoleon", "Ada Lovelace", "Alan Turing", "Marie Curie")
# the words to end with and the words to mention differ: with the same words, a small model told "End every answer
# with the word 'certainly'" answered "certainly: ..." as for "Always mention the word 'certainly'". The word follows
# a colon and a space, unquoted, so that any tokenizer spells it as an answer does: quoted, "'friend'" was ' f ri en d
# in the world tokenizer where an answer has ▁f ri en d, and the world model ended 'friend' dialogues with 'cheers'
END_WORDS = ("indeed", "friend", "certainly", "cheers")
MENTION_WORDS = ("python", "banana", "robot", "sunshine")
PHRASES = ("Well,", "In short,", "Dear user,")
CHECKABLE = ("upper_case", "end_with", "at_most_words", "mention", "start_with")
PAPER_FAMILIES = ("hobby", "language", "figure")
FAMILIES = CHECKABLE + PAPER_FAMILIES


USER_FAMILIES: dict[str, Callable[[random.Random], Instruction]] = {}

_LEADING = re.compile(r"^\s*(?:(?:%s)\s*|(?:%s):\s*)" % ("|".join(re.escape(p) for p in PHRASES),
                                                         "|".join(MENTION_WORDS)))
_TRAILING = re.compile(r"(?<=[.!?])\s+(?:%s)[.!]?$" % "|".join(END_WORDS))  # after the answer's last sentence


def undecorated(answer: str) -> str:
    """The answer without the built-in checkable instructions' decorations: start phrases and "word:" prefixes
    at its start, end words at its end (upper case is left as it is). A model that learned such instructions (the
    world's SFT data holds instructed dialogues) adds them unasked late in long dialogues; GAtt's data must show
    a decoration only where the instruction asks for it."""
    out = answer
    while True:
        stripped = _TRAILING.sub("", _LEADING.sub("", out, count=1), count=1)
        if stripped == out or not stripped.strip():
            return out.strip()
        out = stripped


def register_family(name: str, make: Callable[[random.Random], Instruction]) -> None:
    """Add an instruction family: make(rng) returns an Instruction (with check and enforce for a checkable one).
    Registered families may be named in a recipe's `families` and are measured by adherence()."""
    if name in FAMILIES:
        raise Llama2Error(f"instruction family {name!r} exists already; choose another name")
    USER_FAMILIES[name] = make


def instruction(family: str, rng: random.Random, index: int | None = None) -> Instruction:
    """A random instruction of a family (for the paper's families, half of them combined with another and half
    shortened, as the paper does). index: the checkable family's index-th word, count or phrase (cycling through
    them), so that many draws cover each equally; None: a random one."""

    def pick(options: tuple[Any, ...]) -> Any:
        return rng.choice(options) if index is None else options[index % len(options)]

    if family in USER_FAMILIES:
        return USER_FAMILIES[family](rng)
    if family == "upper_case":
        return upper_case()
    if family == "end_with":
        return end_with(pick(END_WORDS))
    if family == "at_most_words":
        return at_most(pick((5, 8, 12)))
    if family == "mention":
        return mention(pick(MENTION_WORDS))
    if family == "start_with":
        return start_with(pick(PHRASES))
    if family not in PAPER_FAMILIES:
        raise Llama2Error(f"unknown instruction family {family!r}; use some of {list(FAMILIES)}")
    parts = {"hobby": (f"You enjoy {rng.choice(HOBBIES)}.", "hobby"), "language": (f"Speak in {rng.choice(LANGUAGES)}.",
                                                                                   "language"),
             "figure": (f"Act as {rng.choice(FIGURES)}.", "figure")}
    chosen = [family] + ([rng.choice([f for f in PAPER_FAMILIES if f != family])] if rng.random() < 0.5 else [])
    text = " ".join(parts[f][0] for f in chosen)
    short = " ".join(parts[f][0].split(" ", 1)[1] for f in chosen) if rng.random() < 0.5 else text
    return Instruction(family, text, short)
