"""Constrained decoding: every generated text matches a grammar (a JSON Schema, any JSON object, a regular
expression or a Lark grammar), enforced in the batched step as a mask over the vocabulary.

The grammars are compiled and matched by llguidance (a maintained Rust library, the one vLLM, SGLang and
llama.cpp's guidance use): each constrained request holds a matcher that, before every step, gives the set of
tokens whose bytes keep the text inside the grammar (EOS only where the text is complete), and consumes the
token drawn. The engine masks the other tokens' logits to -inf before sampling, so temperature, top-k and top-p
apply within the allowed set, and ends the request when the grammar admits nothing more. JSON is written
compactly with ", " and ": " between items (no free whitespace, which a small model could repeat forever).

A text cut by max_new_tokens is a prefix of a valid one: check finish_reason == "stop".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import Llama2Error
from ..tokenizer import encode_continuation, piece_bytes

KINDS = ("json_object", "json_schema", "regex", "lark")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401  (the bitmask helpers)
    except ImportError:
        raise Llama2Error("constrained decoding needs llguidance, a dependency of llama2: reinstall it "
                          "(pip install -e .) or pip install 'llguidance==1.9.1'") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What the text must match: kind json_object (any JSON object; source unused), json_schema (source: the
    schema as JSON text), regex (source: the expression, matched whole) or lark (source: a Lark grammar whose
    start rule is `start`)."""

    kind: Literal["json_object", "json_schema", "regex", "lark"]
    source: str = ""

    def compiled(self) -> str:
        """The grammar in llguidance's form (a clear error for an unknown kind or a schema that is not JSON)."""
        llg = _llguidance()
        if self.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.source)
            except ValueError as e:
                raise Llama2Error(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise Llama2Error("a JSON schema must be a JSON object")
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "lark":
            return llg.LLMatcher.grammar_from_lark(self.source)
        raise Llama2Error(f"unknown grammar kind {self.kind!r}; choose one of {', '.join(KINDS)}")


class _SentencePieceVocabulary:
    """What llguidance needs of a SentencePiece tokenizer: every id's bytes as they read inside a text (▁ is a
    space, a byte piece <0xNN> is that byte), the special ids, EOS, and encoding a text fragment."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        sp = tokenizer.sp
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(vocab_size):
            if i >= sp.get_piece_size():  # the model's padding rows: never generated
                self.tokens.append(f"<pad{i}>".encode())
                self.special_token_ids.append(i)
                continue
            piece = sp.id_to_piece(i)
            special = sp.is_control(i) or sp.is_unknown(i)
            self.tokens.append(piece.encode() if special else piece_bytes(piece))
            if special:
                self.special_token_ids.append(i)
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        """Ids of a fragment in the middle of a text (no dummy-prefix space: encode_continuation)."""
        s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return encode_continuation(self._tokenizer, s)


class Constrainer:
    """The grammar side of one engine: matchers for requests, and the step's mask over their rows."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltok = None
        self._executor = None

    def matcher(self, grammar: Grammar) -> Any:
        """A fresh matcher for one request; a grammar llguidance rejects is a clear error."""
        llg = _llguidance()
        if self._lltok is None:
            if getattr(self.tokenizer, "sp", None) is None:
                raise Llama2Error("constrained decoding needs a SentencePiece tokenizer (a tokenizer.model)")
            vocab = _SentencePieceVocabulary(self.tokenizer, self.vocab_size)
            self._lltok = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=self.vocab_size)
            self._executor = llg.LLExecutor()
        m = llg.LLMatcher(self._lltok, grammar.compiled(), log_level=0)
        if m.is_error():
            raise Llama2Error(f"the {grammar.kind.replace('_', ' ')} grammar is not usable: {m.get_error()}")
        return m

    def mask(self, logits: Tensor, rows: list[int], matchers: list[Any]) -> Tensor:
        """logits (B, V) with the tokens each matcher forbids at -inf, on the given rows (a copy)."""
        llg = _llguidance()
        bits = llg.torch.allocate_token_bitmask(len(rows), self.vocab_size)
        llg.torch.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bits)
        # bit j of word w is token 32w + j: little-endian bytes, each unpacked low bit first (0/1 bytes: bools)
        vocab = logits.shape[-1]
        allowed = torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")
                                   .view(np.bool_)[:, :vocab])
        if len(rows) < logits.shape[0]:  # unconstrained rows allow everything
            every = torch.ones(logits.shape, dtype=torch.bool)
            every[torch.tensor(rows)] = allowed
            allowed = every
        return torch.where(allowed.to(logits.device), logits, torch.tensor(float("-inf"), dtype=logits.dtype,
                                                                            device=logits.device))


__all__ = ["Grammar", "Constrainer", "KINDS"]
