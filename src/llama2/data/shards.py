"""Token shards on disk, and `TokenShards`, the memory-mapped reader the training loop uses.

Layout of a prepared directory (written by `llama2 data prepare`):

    manifest.json          {"format": "llama2-token-shards", "version": 1, "tokenizer_sha256", "vocab_size",
                            "dtype": "uint16"|"uint32", "bos_id", "eos_id",
                            "splits": {"train": {"tokens", "documents", "shards": [{"file", "tokens",
                            "documents"}, ...]}, "val": {...}}, ...}
    train-00000.bin        raw little-endian token ids; each document is BOS ids... EOS
    train-00000.idx.npy    uint64 start offsets (within the shard) of the documents that begin in it

A split is one token stream cut into shards of `shard_tokens` tokens (the last one shorter); a document may
continue from one shard into the next."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Llama2Error
from ..tokenizer import Tokenizer

FORMAT = "llama2-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
_MAX_OPEN = 64  # memory maps kept open at once


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def dtype_name(vocab_size: int) -> str:
    return "uint16" if token_dtype(vocab_size).itemsize == 2 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def index_name(shard_file: str) -> str:
    """train-00000.bin -> train-00000.idx.npy"""
    return shard_file[: -len(".bin")] + ".idx.npy"


def _redo(path: Path) -> str:
    return f"rerun `llama2 data prepare --tokenizer DIR --input ... --output {path}`"


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a prepared directory, checked for format and version (not for completeness)."""
    path = Path(path)
    if not path.is_dir():
        raise Llama2Error(f"token shard directory {path} does not exist; create it with "
                          f"`llama2 data prepare --tokenizer DIR --input ... --output {path}`")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise Llama2Error(f"{mpath} is missing: {path} is not a prepared token shard directory; create it with "
                          f"`llama2 data prepare --tokenizer DIR --input ... --output {path}`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Llama2Error(f"{mpath} is not valid JSON ({e}); {_redo(path)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Llama2Error(f"{mpath} is not a {FORMAT!r} manifest; {_redo(path)}")
    if manifest.get("version") != VERSION:
        raise Llama2Error(f"{mpath} has format version {manifest.get('version')!r}; this llama2 reads version "
                          f"{VERSION}; {_redo(path)}")
    return manifest


class TokenShards:
    """Read-only view of one split of a prepared directory as a single token stream.

    `read(start, length)` returns tokens [start, start + length) as int64, across shard boundaries, through
    np.memmap (only the touched pages are read). Picklable (for DataLoader workers): maps reopen lazily."""

    def __init__(self, path: Path | str, split: str = "train"):
        self.path = Path(path)
        self.split = split
        manifest = load_manifest(self.path)
        mpath = self.path / MANIFEST
        if not manifest.get("complete", False):
            raise Llama2Error(f"{mpath}: the preparation of {self.path} is unfinished (interrupted?); rerun the same "
                              f"`llama2 data prepare ... --output {self.path}` command to resume it")
        splits = manifest.get("splits") or {}
        if split not in splits:
            raise Llama2Error(f"{mpath} has no split {split!r} (it has: {', '.join(splits) or 'none'})")
        try:
            self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
            info = splits[split]
            shards = [(str(s["file"]), int(s["tokens"]), int(s["documents"])) for s in info["shards"]]
            self.num_tokens, self.num_documents = int(info["tokens"]), int(info["documents"])
            self.vocab_size = int(manifest["vocab_size"])
            self.tokenizer_sha256 = str(manifest["tokenizer_sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise Llama2Error(f"{mpath} is incomplete or malformed ({type(e).__name__}: {e}); "
                              f"{_redo(self.path)}") from None
        if self.dtype.name not in ("uint16", "uint32"):
            raise Llama2Error(f"{mpath}: dtype {manifest['dtype']!r} is not uint16 or uint32; {_redo(self.path)}")
        if self.dtype != token_dtype(self.vocab_size):
            raise Llama2Error(f"{mpath}: dtype {self.dtype.name} does not match vocab_size {self.vocab_size}; "
                              f"{_redo(self.path)}")
        if sum(t for _, t, _ in shards) != self.num_tokens or sum(d for _, _, d in shards) != self.num_documents:
            raise Llama2Error(f"{mpath}: the {split} shards do not add up to the split's token/document counts; "
                              f"{_redo(self.path)}")
        self.manifest = manifest
        for file, tokens, docs in shards:
            self._check_shard(file, tokens, docs)
        self._files = [self.path / f for f, _, _ in shards]
        self._sizes = np.array([t for _, t, _ in shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def _check_shard(self, file: str, tokens: int, docs: int) -> None:
        bin_path = self.path / file
        if Path(file).name != file or not file.endswith(".bin"):
            raise Llama2Error(f"{self.path / MANIFEST}: bad shard file name {file!r}; {_redo(self.path)}")
        if not bin_path.is_file():
            raise Llama2Error(f"shard file {bin_path} is missing; {_redo(self.path)}")
        size, want = bin_path.stat().st_size, tokens * self.dtype.itemsize
        if size != want:
            raise Llama2Error(f"shard file {bin_path} has {size} bytes but the manifest says {tokens} tokens "
                              f"({want} bytes as {self.dtype.name}); the file is truncated or foreign; "
                              f"{_redo(self.path)}")
        idx_path = self.path / index_name(file)
        try:
            idx = np.load(idx_path, mmap_mode="r")
        except FileNotFoundError:
            raise Llama2Error(f"document index {idx_path} is missing; {_redo(self.path)}") from None
        except (ValueError, OSError) as e:
            raise Llama2Error(f"document index {idx_path} is unreadable ({e}); {_redo(self.path)}") from None
        if idx.ndim != 1 or idx.shape[0] != docs:
            raise Llama2Error(f"document index {idx_path} lists {idx.shape[0] if idx.ndim else 0} documents but "
                              f"the manifest says {docs}; {_redo(self.path)}")

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.path)!r}, split={self.split!r}, tokens={self.num_tokens}, "
                f"documents={self.num_documents}, shards={len(self._files)}, dtype={self.dtype.name})")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def _map(self, i: int) -> np.memmap:
        m = self._maps.get(i)
        if m is None:
            m = np.memmap(self._files[i], dtype=self.dtype, mode="r", shape=(int(self._sizes[i]),))
            self._maps[i] = m
            if len(self._maps) > _MAX_OPEN:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(i)
        return m

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split as a new int64 array (crossing shard boundaries)."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) is outside the {self.split} split's {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        if length == 0:
            return out
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos, done = start, 0
        while done < length:
            lo = pos - int(self._offsets[i])
            take = min(length - done, int(self._sizes[i]) - lo)
            out[done:done + take] = self._map(i)[lo:lo + take]
            done += take
            pos += take
            i += 1
        return out

    def document_starts(self) -> np.ndarray:
        """int64 start offset (in the split's token stream) of every document, in order."""
        parts = [np.load(self.path / index_name(f.name)).astype(np.int64) + int(off)
                 for f, off in zip(self._files, self._offsets[:-1])]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise Llama2Error unless tokenizer (a Tokenizer, or a tokenizer.model path/directory) is the one these
        shards were prepared with (same sha256 of tokenizer.model)."""
        if isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer(tokenizer)
        sha = getattr(tokenizer, "sha256", None)
        if sha != self.tokenizer_sha256:
            name = getattr(tokenizer, "model_path", tokenizer)
            raise Llama2Error(f"shards were prepared with a different tokenizer: {self.path / MANIFEST} records "
                              f"tokenizer sha256 {self.tokenizer_sha256[:16]}..., but {name} has "
                              f"{str(sha)[:16]}...; use the tokenizer the shards were prepared with, or prepare them "
                              f"again with this one (`llama2 data prepare --tokenizer ... --output {self.path}`)")
