"""`llama2 data corpus`: gather documents from sources, remove exact and near duplicates, hold out a validation
split by document, and write DIR/train.jsonl, DIR/val.jsonl ({"text": ...} per line) and DIR/stats.json."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_open, atomic_write_json, make_dir
from ..errors import Llama2Error
from .dedup import NUM_PERM, SHINGLE_WORDS, DedupCounts, deduplicate, lsh_params
from .sources import expand_sources, source_documents

TRAIN_FILE, VAL_FILE, STATS_FILE = "train.jsonl", "val.jsonl", "stats.json"


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document indices: a seeded permutation of range(n); the first round(n * val_fraction)
    (at least one when the fraction is positive and n >= 2, never all) are validation. Both come in the
    permuted order, so the written files mix the sources."""
    if not 0.0 <= val_fraction < 1.0:
        raise Llama2Error(f"--val-fraction {val_fraction} must be in [0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, round(n * val_fraction)), n - 1)
    return perm[n_val:], perm[:n_val]


def _counted(texts: Iterable[str], counts: dict[str, int], source: str, skipped: list[int]) -> Iterator[str]:
    for text in texts:
        text = text.strip()
        if not text:
            skipped[0] += 1
            continue
        counts[source] = counts.get(source, 0) + 1
        yield text


def _write_jsonl(path: Path, texts: list[str], order: np.ndarray) -> int:
    chars = 0
    with atomic_open(path, "w") as f:
        for i in order:
            f.write(json.dumps({"text": texts[i]}, ensure_ascii=False) + "\n")
            chars += len(texts[i])
    return chars


def build_corpus(sources: list[str], paths: list[Path], output: Path, *, val_fraction: float = 0.01,
                 seed: int = 0, near_dup_threshold: float = 0.8, quiet: bool = False,
                 workers: int | None = None) -> dict:
    """Build a deduplicated corpus from sources ("default" = stdlib + pydoc, "stdlib", "pydoc", "python-docs",
    "files" with paths) into output; returns the stats also written to output/stats.json."""
    names = expand_sources(list(sources))
    paths = [Path(p) for p in paths or []]
    if paths and "files" not in names:
        raise Llama2Error("input paths are only read with --source files; add it (e.g. --source files PATHS...)")
    if not 0.0 <= val_fraction < 1.0:
        raise Llama2Error(f"--val-fraction {val_fraction} must be in [0, 1)")
    bands, rows = lsh_params(near_dup_threshold)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise Llama2Error(f"--output {output} is a file; give a directory")

    # open every source first so a missing package or file fails before any slow work
    streams = [(name, source_documents(name, paths, workers)) for name in names]
    per_source: dict[str, int] = {name: 0 for name in names}
    skipped = [0]
    counts = DedupCounts()
    texts: list[str] = []
    docs = itertools.chain.from_iterable(_counted(stream, per_source, name, skipped) for name, stream in streams)
    with tqdm(unit="doc", desc="corpus (read + dedup)", disable=quiet) as bar:
        for text in deduplicate(docs, near_dup_threshold, counts):
            texts.append(text)
            bar.update(1)
    if not texts:
        raise Llama2Error(f"the sources {', '.join(names)} gave no documents; check the inputs")

    train_idx, val_idx = split_documents(len(texts), val_fraction, seed)
    make_dir(output)
    train_chars = _write_jsonl(output / TRAIN_FILE, texts, train_idx)
    val_chars = _write_jsonl(output / VAL_FILE, texts, val_idx)
    stats = {
        "sources": names,
        "inputs": [str(p) for p in paths],
        "documents_in": sum(per_source.values()),
        "documents_per_source": per_source,
        "empty_documents_skipped": skipped[0],
        "exact_duplicates_removed": counts.exact_duplicates_removed,
        "near_duplicates_removed": counts.near_duplicates_removed,
        "documents_kept": len(texts),
        "near_dup_threshold": near_dup_threshold,
        "minhash": {"num_perm": NUM_PERM, "shingle_words": SHINGLE_WORDS, "bands": bands, "rows": rows},
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": {
            "train": {"file": TRAIN_FILE, "documents": int(len(train_idx)), "chars": train_chars},
            "val": {"file": VAL_FILE, "documents": int(len(val_idx)), "chars": val_chars},
        },
    }
    atomic_write_json(output / STATS_FILE, stats)
    return stats
