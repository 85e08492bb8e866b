"""Training a SentencePiece BPE tokenizer with the Llama 2 settings: BPE, byte fallback, digits split into single
digits, identity normaliser, dummy prefix, unk 0 / BOS 1 / EOS 2 and no pad id. Reserved strings (SentencePiece's
user_defined_symbols: whole words, the chat tags [INST] [/INST] <<SYS>> <</SYS>>) always encode as one piece."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from ..errors import Llama2Error
from ..tokenizer import N_BYTE_PIECES, N_SPECIAL, Tokenizer, save_model_bytes
from .jsonl import BadLine
from .sources import jsonl_texts


def _iter_sentences(paths: list[Path], bar, error: list) -> Iterator[str]:
    """Lines of .txt files and the lines of each "text" of .jsonl files, streamed; bar counts bytes.

    A problem is stored in `error` and ends the stream (an exception raised inside SentencePiece's iterator
    would come back as a RuntimeError)."""
    try:
        for path in paths:
            if path.suffix.lower() in (".jsonl", ".ndjson"):
                for text in jsonl_texts(path, progress=bar.update):
                    for part in text.splitlines():
                        if part:
                            yield part
                continue
            with path.open("rb") as f:
                for lineno, raw in enumerate(f, 1):
                    bar.update(len(raw))
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError:
                        raise BadLine(path, lineno, "not valid UTF-8; convert the file to UTF-8") from None
                    if line:
                        yield line
    except Llama2Error as e:
        error.append(e)


def _training_error(e: RuntimeError, vocab_size: int) -> Llama2Error:
    msg = str(e)
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        return Llama2Error(f"--vocab-size {vocab_size} is too large for this training text: it supports at most "
                           f"{m.group(2)} pieces; lower --vocab-size or give more text")
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg):
        return Llama2Error(f"--vocab-size {vocab_size} is too small: the 256 byte pieces, 3 special pieces and the "
                           f"characters of this text need at least {m.group(2)}; raise --vocab-size")
    if "sentences_.empty()" in msg or "!sentences_" in msg:
        return Llama2Error("the training input holds no usable text (empty files, or every line longer than "
                           "--max-sentence-length)")
    return Llama2Error(f"SentencePiece training failed: {msg.strip()[:300]}")


SPECIAL_PIECES = ("<unk>", "<s>", "</s>")


def check_reserved(reserved: Sequence[str], what: str = "--reserved") -> list[str]:
    """The reserved strings as a list; a Llama2Error for an empty, duplicated, special or whitespace-holding one
    (SentencePiece matches them after spaces become "▁", so a string with a space would never match)."""
    out: list[str] = []
    for r in reserved:
        if not isinstance(r, str) or not r:
            raise Llama2Error(f"{what}: {r!r} is not a non-empty string; give the exact text to keep as one piece")
        if any(c.isspace() for c in r):
            raise Llama2Error(f"{what}: {r!r} holds whitespace; a reserved string must be one word or tag without "
                              "spaces (SentencePiece never matches a space inside one)")
        if r in SPECIAL_PIECES:
            raise Llama2Error(f"{what}: {r!r} is already a special piece of every Llama 2 tokenizer; leave it out")
        if r in out:
            raise Llama2Error(f"{what}: {r!r} is given twice; list each reserved string once")
        out.append(r)
    return out


def train_tokenizer(inputs: list[Path | str], vocab_size: int, output: Path | str, *,
                    max_sentence_length: int = 16384, input_sentence_size: int = 2_000_000,
                    reserved: Sequence[str] = (), quiet: bool = False) -> Tokenizer:
    """Train a SentencePiece BPE tokenizer with the Llama 2 settings on .txt / .jsonl files
    and save it (tokenizer.model + Hugging Face config) into the output directory. `reserved` strings
    (user_defined_symbols: ids 3, 4, ... in order, before the byte pieces) each encode as one piece wherever they
    occur."""
    reserved = check_reserved(reserved)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise Llama2Error("no training input given; pass one or more .txt or .jsonl files")
    for p in paths:
        if not p.is_file():
            raise Llama2Error(f"training input not found: {p}")
    minimum = N_BYTE_PIECES + N_SPECIAL + len(reserved)
    if vocab_size <= minimum:
        extra = f" + {len(reserved)} reserved pieces" if reserved else ""
        raise Llama2Error(f"--vocab-size {vocab_size} is too small: it must exceed the {N_BYTE_PIECES} byte pieces "
                          f"+ {N_SPECIAL} special pieces{extra} ({minimum}) plus the characters of the text")
    if max_sentence_length < 1 or input_sentence_size < 0:
        raise Llama2Error("max_sentence_length must be positive and input_sentence_size non-negative")

    error: list[Llama2Error] = []
    model = io.BytesIO()
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading text", disable=quiet) as bar:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_iter_sentences(paths, bar, error),
                model_writer=model,
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                split_digits=True,
                normalization_rule_name="identity",
                add_dummy_prefix=True,
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                character_coverage=0.99995,
                max_sentencepiece_length=16,
                max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                user_defined_symbols=reserved,
                hard_vocab_limit=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2 if quiet else 1,
            )
        except RuntimeError as e:
            if error:
                raise error[0] from None
            raise _training_error(e, vocab_size) from None
    if error:
        raise error[0]
    return save_model_bytes(model.getvalue(), output)
