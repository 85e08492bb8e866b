"""The search tool: Okapi BM25 ranking over a local corpus of documents (the built-in world's pretraining corpus,
or any JSONL file of {"text": ...} lines). Words are lower-cased runs of letters and digits; a query returns the
best documents' text, most relevant first."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

WORD = re.compile(r"[a-z0-9]+")
K1, B = 1.5, 0.75  # BM25's term-frequency saturation and length normalisation (the usual values)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class BM25Index:
    """Documents indexed for BM25: `search(query, k)` gives (score, document index) pairs, best first."""

    def __init__(self, documents: Sequence[str]) -> None:
        self.documents = list(documents)
        self.postings: dict[str, list[tuple[int, int]]] = {}  # word -> (document, count)
        self.lengths = []
        for i, doc in enumerate(self.documents):
            counts = Counter(words(doc))
            self.lengths.append(sum(counts.values()))
            for w, c in counts.items():
                self.postings.setdefault(w, []).append((i, c))
        n = len(self.documents)
        self.average = (sum(self.lengths) / n) if n else 0.0
        self.idf = {w: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for w, p in self.postings.items()}

    def search(self, query: str, k: int = 3) -> list[tuple[float, int]]:
        scores: dict[int, float] = {}
        for w in set(words(query)):
            idf = self.idf.get(w)
            if idf is None:
                continue
            for doc, count in self.postings[w]:
                norm = count + K1 * (1 - B + B * self.lengths[doc] / self.average)
                scores[doc] = scores.get(doc, 0.0) + idf * count * (K1 + 1) / norm
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [(s, d) for d, s in best]


def sentences_about(text: str, query: str) -> str:
    """The sentences of a document that share a word with the query other than stop words (all of it if none)."""
    stop = {"the", "a", "an", "of", "is", "in", "what", "who", "which", "does", "do", "was", "and", "to", "how"}
    wanted = set(words(query)) - stop
    parts = re.split(r"(?<=[.!?])\s+|\n", text)
    kept = [s for s in parts if wanted & set(words(s))]
    return " ".join(kept) if kept else text


class Search:
    """The search tool over documents: the top `k` documents, each cut to the sentences that mention the query's
    words, joined and capped at `max_chars`."""

    def __init__(self, documents: Sequence[str], k: int = 1, max_chars: int = 300) -> None:
        self.index = BM25Index(documents)
        self.k, self.max_chars = k, max_chars

    def __call__(self, query: str) -> str:
        hits = self.index.search(query, self.k)
        if not hits:
            return "no results"
        text = " ".join(sentences_about(self.index.documents[d], query) for _, d in hits)
        return text if len(text) <= self.max_chars else text[:self.max_chars].rsplit(" ", 1)[0] + " ..."
