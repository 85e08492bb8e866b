"""`llama2 data prepare`: tokenise documents (SentencePiece's threaded batch encode) into memory-mapped token
shards (format in shards.py). Every shard is written atomically and then recorded in manifest.json together with
the input position after it, so a rerun after a kill resumes there and ends byte-identical to an uninterrupted
run."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_open, atomic_write_json, make_dir, remove_stale_temps
from ..errors import Llama2Error
from ..tokenizer import Tokenizer
from .shards import FORMAT, MANIFEST, SPLITS, VERSION, dtype_name, index_name, load_manifest, shard_name, token_dtype
from .sources import expand_paths, jsonl_texts

CORPUS_FILES = {"train": "train.jsonl", "val": "val.jsonl"}
BATCH_DOCS, BATCH_CHARS = 1024, 4_000_000  # documents handed to one encode_batch call


@dataclass(frozen=True)
class InputFile:
    """One input file and where its documents go: "train", "val", or "split" (by a hash of the text)."""
    path: Path
    role: str


def plan_inputs(inputs: list[Path], val_fraction: float | None) -> list[InputFile]:
    """Corpus directories give train.jsonl -> train and val.jsonl -> val; .jsonl/.txt files (or directories of
    them) go to train, or are split by document when val_fraction is given."""
    if not inputs:
        raise Llama2Error("no --input given; pass a corpus directory (from `llama2 data corpus`) or .jsonl/.txt files")
    plan: list[InputFile] = []
    for p in map(Path, inputs):
        if p.is_dir() and (p / CORPUS_FILES["train"]).is_file():
            plan += [InputFile(p / f, split) for split, f in CORPUS_FILES.items() if (p / f).is_file()]
        else:
            role = "train" if val_fraction is None else "split"
            plan += [InputFile(f, role) for f in expand_paths([p])]
    return plan


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic per-document choice: a keyed hash of the text, as a fraction of 2^64, below val_fraction."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"llama2-val").digest()
    return int.from_bytes(h, "little") < val_fraction * 2.0**64


def _file_texts(f: InputFile) -> Iterator[str]:
    if f.path.suffix.lower() == ".jsonl":
        yield from jsonl_texts(f.path)
    else:
        try:
            yield f.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise Llama2Error(f"{f.path}: not valid UTF-8 (byte {e.start}); convert the file to UTF-8") from None


def split_texts(plan: list[InputFile], split: str, val_fraction: float | None) -> Iterator[str]:
    """The documents of one split, in input order; blank documents are left out."""
    for f in plan:
        if f.role not in (split, "split"):
            continue
        for text in _file_texts(f):
            if not text.strip():
                continue
            if f.role == "split" and is_val(text, val_fraction or 0.0) != (split == "val"):
                continue
            yield text


def _batches(texts: Iterator[str], skip: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for i, text in enumerate(texts):
        if i < skip:
            continue
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _ShardFile:
    """A shard being written: a temp file in the output directory, renamed into place by commit()."""

    def __init__(self, output: Path, name: str):
        self.output, self.name = output, name
        fd, self.tmp = tempfile.mkstemp(dir=output, prefix=f".{name}.", suffix=".tmp")
        self.f = os.fdopen(fd, "wb")
        self.tokens = 0
        self.starts: list[int] = []

    def write(self, arr: np.ndarray) -> None:
        self.f.write(arr.tobytes())
        self.tokens += arr.size

    def commit(self) -> dict[str, Any]:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(self.f.fileno(), 0o666 & ~umask)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.output / self.name)
        with atomic_open(self.output / index_name(self.name), "wb") as f:
            np.save(f, np.asarray(self.starts, dtype="<u8"))
        return {"file": self.name, "tokens": self.tokens, "documents": len(self.starts)}

    def abort(self) -> None:
        self.f.close()
        Path(self.tmp).unlink(missing_ok=True)


class _Stop(Exception):
    """Raised internally after _max_shards shards (tests use it to simulate a kill)."""


def _header(tok: Any, plan: list[InputFile], shard_tokens: int,
            val_fraction: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the manifest's fixed format fields, the settings a resumed run must share)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": int(tok.vocab_size),
        "dtype": dtype_name(tok.vocab_size),
        "bos_id": int(tok.bos_id),
        "eos_id": int(tok.eos_id),
    }, {
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "inputs": [{"path": str(f.path.resolve()), "split": f.role, "bytes": f.path.stat().st_size} for f in plan],
    }


def _manifest(header: dict, settings: dict, splits: dict, resume: dict | None) -> dict[str, Any]:
    m = {**header, "splits": splits, "complete": resume is None, **settings}
    if resume is not None:
        m["resume"] = resume
    return m


def prepare_shards(tokenizer_dir: Path | str, inputs: list[Path], output: Path, *, workers: int | None = None,
                   shard_tokens: int = 50_000_000, val_fraction: float | None = None, quiet: bool = False,
                   _max_shards: int | None = None) -> dict:
    """Tokenise the inputs into token shards in output (resuming an unfinished run there); returns the manifest.

    Each document is stored as encode(text, bos=True, eos=True). `_max_shards` stops after that many new shards,
    leaving an unfinished manifest, as a kill would (for tests)."""
    if shard_tokens < 1:
        raise Llama2Error(f"--shard-tokens {shard_tokens} must be positive")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise Llama2Error(f"--val-fraction {val_fraction} must be in (0, 1)")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise Llama2Error(f"--workers {workers} must be at least 1")
    tok = Tokenizer(tokenizer_dir)
    plan = plan_inputs(list(inputs), val_fraction)
    header, settings = _header(tok, plan, shard_tokens, val_fraction)
    dtype = token_dtype(tok.vocab_size)
    output = Path(output)
    make_dir(output, "--output directory")

    splits: dict[str, dict] = {s: {"tokens": 0, "documents": 0, "shards": []} for s in SPLITS}
    resume = {"split": SPLITS[0], "document": 0, "offset": 0}
    if (output / MANIFEST).exists():
        old = load_manifest(output)
        ours = {k: old.get(k) for k in (*header, *settings)}
        if ours != {**header, **settings}:
            diff = [k for k in ours if ours[k] != {**header, **settings}[k]]
            raise Llama2Error(f"{output} already holds token shards made with other settings ({', '.join(diff)} "
                              f"differ); give a new --output directory or delete {output}")
        if old.get("complete"):
            return old
        splits, resume = old["splits"], old["resume"]
    remove_stale_temps(output, tuple(f"{s}-" for s in SPLITS) + (MANIFEST,))
    atomic_write_json(output / MANIFEST, _manifest(header, settings, splits, resume))

    written = 0
    for si, split in enumerate(SPLITS):
        if SPLITS.index(resume["split"]) > si:
            continue
        state = splits[split]
        first_doc, first_off = (resume["document"], resume["offset"]) if resume["split"] == split else (0, 0)
        doc = first_doc
        shard: _ShardFile | None = None
        bar = tqdm(desc=f"prepare {split}", unit="tok", unit_scale=True, initial=state["tokens"], disable=quiet)
        try:
            for batch in _batches(split_texts(plan, split, val_fraction), first_doc):
                for ids in tok.encode_batch(batch, bos=True, eos=True, num_threads=workers):
                    arr = np.asarray(ids, dtype=dtype)
                    o = first_off if doc == first_doc else 0
                    while o < arr.size:
                        if shard is None:
                            shard = _ShardFile(output, shard_name(split, len(state["shards"])))
                        take = min(arr.size - o, shard_tokens - shard.tokens)
                        if o == 0:
                            shard.starts.append(shard.tokens)
                        shard.write(arr[o:o + take])
                        o += take
                        bar.update(take)
                        if shard.tokens == shard_tokens:
                            after = {"split": split, "document": doc + (o == arr.size), "offset": o % arr.size}
                            _finish_shard(output, shard, state, header, settings, splits, after)
                            shard = None
                            written += 1
                            if _max_shards is not None and written >= _max_shards:
                                raise _Stop
                    doc += 1
            if shard is not None:
                after = {"split": split, "document": doc, "offset": 0}
                _finish_shard(output, shard, state, header, settings, splits, after)
                shard = None
        except _Stop:
            return load_manifest(output)
        finally:
            bar.close()
            if shard is not None:
                shard.abort()
        resume = {"split": SPLITS[si + 1], "document": 0, "offset": 0} if si + 1 < len(SPLITS) else None
        if resume is not None:
            atomic_write_json(output / MANIFEST, _manifest(header, settings, splits, resume))
    manifest = _manifest(header, settings, splits, None)
    atomic_write_json(output / MANIFEST, manifest)
    return manifest


def _finish_shard(output: Path, shard: _ShardFile, state: dict, header: dict, settings: dict, splits: dict,
                  after: dict) -> None:
    """Commit a shard's files, then record it and the input position after it in the manifest."""
    entry = shard.commit()
    state["shards"].append(entry)
    state["tokens"] += entry["tokens"]
    state["documents"] += entry["documents"]
    atomic_write_json(output / MANIFEST, _manifest(header, settings, splits, after))
