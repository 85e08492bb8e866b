"""Weighted data mixes: several sources (dialogue or comparison files, built-in sets), each taking `weight` x its
size (a seeded subsample below 1, repeats above) or a `share` of the mixed epoch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import Llama2Error
from ..recipe import check


@dataclass
class WeightedSource:
    """One source of a data mix (dialogues here, comparisons in the reward stage): a file or a built-in set, its
    held-out file, and how much of it the mix takes: `weight` x its size (a seeded subsample below 1, repeats
    above), or a `share` of the mixed set."""

    path: str = ""
    val_path: str | None = None
    weight: float | None = None
    share: float | None = None

    def validate(self, prefix: str, what: str = "a JSONL file") -> None:
        check(bool(self.path), f"{prefix}.path", self.path, what)
        check(self.weight is None or self.share is None, f"{prefix}.share", self.share,
               "unset when weight is set (give one of weight, share)")
        check(self.weight is None or self.weight >= 0, f"{prefix}.weight", self.weight, "a number >= 0")
        check(self.share is None or 0 < self.share < 1, f"{prefix}.share", self.share, "a number in (0, 1)")


def check_mix(sources: Sequence[WeightedSource], prefix: str, what: str) -> None:
    """Each source valid, at least one weighted, and the shares leaving room for the weighted ones."""
    for i, src in enumerate(sources):
        src.validate(f"{prefix}.{i}", what)
    if sources and all(src.share is not None for src in sources):
        raise Llama2Error(f"every source of {prefix} has a share; give at least one a weight (the shares are "
                          "fractions of the mix the weighted sources make)")
    if sum(src.share or 0.0 for src in sources) >= 1:
        raise Llama2Error(f"the shares of {prefix} add up to 1 or more; they must leave room for the weighted "
                          "sources")


def epoch_counts(sizes: Sequence[int], weights: Sequence[float | None], shares: Sequence[float | None]) -> list[int]:
    """Pairs per epoch from each source: round(weight x size); a share s of the mixed epoch gives
    round(s x N) with N = (the weighted pairs) / (1 - the sum of shares)."""
    weighted = [round(w * n) if w is not None else 0 for n, w in zip(sizes, weights)]
    total = sum(weighted) / (1.0 - sum(s or 0.0 for s in shares))
    return [round(s * total) if s is not None else c for c, s in zip(weighted, shares)]


def draw(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into range(size): every index count // size times, plus a random subset for the rest."""
    full, rest = divmod(count, size)
    return np.concatenate([np.tile(np.arange(size), full), rng.permutation(size)[:rest]]).astype(np.int64)
