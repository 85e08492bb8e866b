"""Duplicate removal: exact duplicates by a hash of the normalised text, near duplicates by MinHash signatures
over word shingles and LSH banding (Broder 1997; Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets",
ch. 3). The first occurrence of a document is kept."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import Llama2Error

NUM_PERM = 128
SHINGLE_WORDS = 5
HASH_SEED = 1  # fixed: which documents count as near duplicates does not depend on the split seed
_MERSENNE = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_key(text: str) -> bytes:
    """128-bit hash of the normalised text: equal for texts that differ only in case, width or spacing."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads every input bit over the whole word."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _mod_mersenne(v: np.ndarray) -> np.ndarray:
    """v mod (2^61 - 1), truncated to 32 bits, in place (2^61 = 1 mod p: fold the high bits onto the low)."""
    r = v & _MERSENNE
    v >>= np.uint64(61)
    r += v
    np.subtract(r, _MERSENNE, out=r, where=r >= _MERSENNE)
    r &= _MASK32
    return r


@functools.lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm whose S-curve 1 - (1 - s^rows)^bands best separates
    similarities below and above threshold (least false-positive plus false-negative area)."""
    if not 0.0 < threshold <= 1.0:
        raise Llama2Error(f"near-duplicate threshold {threshold} must be in (0, 1]")
    s = np.linspace(0.0, 1.0, 1001)
    below, above = s <= threshold, s >= threshold

    def area(y: np.ndarray) -> float:  # trapezoid rule on the grid s (numpy-version independent)
        return float(np.sum(y[1:] + y[:-1]) * 0.5 * (s[1] - s[0]))

    best, best_cost = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - s**rows) ** bands
            cost = area(np.where(below, p, 0.0)) + area(np.where(above, 1.0 - p, 0.0))
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


class MinHasher:
    """MinHash signatures of the set of word k-shingles of a text, with num_perm universal hash functions
    h(x) = (a x + b) mod (2^61 - 1), truncated to 32 bits."""

    def __init__(self, num_perm: int = NUM_PERM, shingle_words: int = SHINGLE_WORDS, seed: int = HASH_SEED):
        rng = np.random.default_rng(seed)
        self.num_perm, self.shingle_words = num_perm, shingle_words
        # a, b < 2^32 and x < 2^32 keep a*x + b below 2^64: no uint64 overflow
        self.a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
        self._word_hash: dict[str, int] = {}

    def _words(self, text: str) -> np.ndarray:
        cache = self._word_hash
        if len(cache) > 2_000_000:
            cache.clear()
        out = []
        for w in _WORD.findall(normalize(text)):
            h = cache.get(w)
            if h is None:
                h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
            out.append(h)
        return np.array(out, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """Sorted unique 32-bit hashes of the text's word k-shingles (one shingle of all words if fewer than k)."""
        w = self._words(text)
        if w.size == 0:
            return w
        k = min(self.shingle_words, w.size)
        n = w.size - k + 1
        h = w[:n].copy()
        for j in range(1, k):
            h = (h * np.uint64(0x100000001B3)) ^ w[j:j + n]
        return np.unique(_fmix64(h) >> np.uint64(32))

    def signature(self, text: str) -> np.ndarray | None:
        """uint32[num_perm] minimum hash per permutation; None for a text without words."""
        x = self.shingles(text)
        if x.size == 0:
            return None
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, x.size, 4096):
            hv = x[i:i + 4096, None] * self.a[None, :]
            hv += self.b[None, :]
            np.minimum(sig, _mod_mersenne(hv).min(axis=0), out=sig)
        return sig.astype(np.uint32)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity estimated from two MinHash signatures: the fraction of equal positions."""
    return float(np.mean(a == b))


class NearDuplicateIndex:
    """LSH index of the signatures of kept documents; `add` keeps a text unless it is a near duplicate
    (estimated Jaccard >= threshold) of one kept before."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM, shingle_words: int = SHINGLE_WORDS):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.hasher = MinHasher(num_perm, shingle_words)
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs: list[np.ndarray] = []

    def add(self, text: str) -> bool:
        """True (and index it) if text is new, False if it is a near duplicate of an indexed text."""
        sig = self.hasher.signature(text)
        if sig is None:
            return True
        r = self.rows
        keys = [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for table, key in zip(self._tables, keys):
            for j in table.get(key, ()):
                if j not in seen:
                    seen.add(j)
                    if jaccard(sig, self._sigs[j]) >= self.threshold:
                        return False
        idx = len(self._sigs)
        self._sigs.append(sig)
        for table, key in zip(self._tables, keys):
            table.setdefault(key, []).append(idx)
        return True


@dataclass
class DedupCounts:
    documents_in: int = 0
    exact_duplicates_removed: int = 0
    near_duplicates_removed: int = 0


def deduplicate(texts: Iterable[str], near_dup_threshold: float = 0.8,
                counts: DedupCounts | None = None) -> Iterator[str]:
    """Stream texts with exact, then near duplicates of earlier texts removed; counts are filled in as it runs."""
    counts = counts if counts is not None else DedupCounts()
    index = NearDuplicateIndex(near_dup_threshold)
    seen: set[bytes] = set()
    for text in texts:
        counts.documents_in += 1
        key = exact_key(text)
        if key in seen:
            counts.exact_duplicates_removed += 1
            continue
        seen.add(key)
        if not index.add(text):
            counts.near_duplicates_removed += 1
            continue
        yield text
