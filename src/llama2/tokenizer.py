"""The Llama 2 tokenizer: a SentencePiece BPE wrapper, training with the paper's settings, and rebuilding a
tokenizer.model from a GGUF vocabulary."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from .atomic import atomic_write_bytes, make_dir
from .errors import Llama2Error
from .paths import resolve_checkpoint

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
MODEL_MAX_LENGTH = 4096  # Llama 2 context (the paper, section 2.2)
N_BYTE_PIECES = 256
N_SPECIAL = 3  # <unk>, <s>, </s>
MAX_MODEL_BYTES = 256 * 2**20  # real tokenizer.model files are a few MiB


# Meta's `chat_completion` (llama2.chat) as a Hugging Face chat template. A system message is merged into
# the first user message, the merged content stripped as a whole (exactly as Meta does); every completed pair is
# "<s>[INST] {user} [/INST] {assistant} </s>", the final user turn "<s>[INST] {user} [/INST]". A conversation that
# ends with an assistant message renders that pair completed (useful for training data). Tool use
# (llama2.tools.format): `tools` are listed at the start of the system message; an assistant message's
# `tool_calls` become "<call>...</call>", each `tool` message "<result>...</result>", and the assistant message
# after them goes on in the same answer (a conversation ending with tool results leaves the answer open).
LLAMA2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- for tag in ['[INST]', '[/INST]', '<<SYS>>', '<</SYS>>'] -%}"
    "{%- if tag in (message['content'] or '') -%}"
    "{{- raise_exception('message content must not contain the special tag ' + tag) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- set ns = namespace(system=none, tools='', out='', last='', open=false, owed=0, first=true) -%}"
    "{%- if tools -%}"
    "{%- set ns.tools = 'You can call these tools:' -%}"
    "{%- for tool in tools -%}"
    "{%- set f = tool['function'] if 'function' in tool else tool -%}"
    "{%- set line = f['name'] + '(' + (((f.get('parameters') or {}).get('properties') or {}) | list | join(', '))"
    " + ')' -%}"
    "{%- set about = (f.get('description') or '') | trim -%}"
    "{%- set ns.tools = ns.tools + '\\n' + line + ((': ' + about) if about else '') -%}"
    "{%- endfor -%}"
    "{%- set ns.tools = ns.tools + '\\nCall one as <call>{\"name\": \"...\", \"arguments\": {...}}</call>.' -%}"
    "{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages | length < 2 or messages[1]['role'] != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}"
    "{%- endif -%}"
    "{%- set ns.system = (ns.tools + '\\n\\n' + messages[0]['content']) if ns.tools else messages[0]['content'] -%}"
    "{%- set dialog = messages[1:] -%}"
    "{%- else -%}"
    "{%- set ns.system = ns.tools if ns.tools else none -%}"
    "{%- set dialog = messages -%}"
    "{%- endif -%}"
    "{%- for message in dialog -%}"
    "{%- set text = message['content'] or '' -%}"
    "{%- set calls = namespace(text='', n=0) -%}"
    "{%- for c in (message.get('tool_calls') or []) if message['role'] == 'assistant' -%}"
    "{%- set f = c['function'] if 'function' in c else c -%}"
    "{%- set args = f.get('arguments', {}) -%}"
    "{%- set calls.text = calls.text + (', ' if calls.n else '') + '{\"name\": ' + (f['name'] | tojson)"
    " + ', \"arguments\": ' + (args if args is string else (args | tojson)) + '}' -%}"
    "{%- set calls.n = calls.n + 1 -%}"
    "{%- endfor -%}"
    "{%- set call_block = ('<call>' + (('[' + calls.text + ']') if calls.n > 1 else calls.text) + '</call>')"
    " if calls.n else '' -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if ns.owed == 0 -%}"
    "{{- raise_exception('a tool message must follow an assistant message with tool_calls, one per call') -}}"
    "{%- endif -%}"
    "{%- set ns.out = ns.out + '\\n<result>' + (text | replace('<call>', '\u2039call\u203a')"
    " | replace('</call>', '\u2039/call\u203a') | replace('<result>', '\u2039result\u203a')"
    " | replace('</result>', '\u2039/result\u203a')) + '</result>' + ('\\n' if ns.owed == 1 else '') -%}"
    "{%- set ns.owed = ns.owed - 1 -%}"
    "{%- elif ns.owed -%}"
    "{{- raise_exception('every tool call needs its tool message before the next message') -}}"
    "{%- elif message['role'] == 'assistant' and ns.open -%}"
    "{%- set ns.out = ns.out + (text | trim) + call_block -%}"
    "{%- set ns.owed, ns.open = calls.n, calls.n > 0 -%}"
    "{%- elif (message['role'] == 'user') != (ns.last != 'user') -%}"
    "{{- raise_exception('roles must be an optional system message, then user and assistant alternating') -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if ns.last == 'assistant' -%}{%- set ns.out = ns.out + ' ' + eos_token -%}{%- endif -%}"
    "{%- if ns.first and ns.system is not none -%}"
    "{%- set text = '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + text -%}"
    "{%- endif -%}"
    "{%- set ns.out = ns.out + bos_token + '[INST] ' + (text | trim) + ' [/INST]' -%}"
    "{%- set ns.last, ns.first, ns.open = 'user', false, false -%}"
    "{%- else -%}"
    "{%- set ns.out = ns.out + ' ' + (text | trim) + call_block -%}"
    "{%- set ns.last, ns.owed, ns.open = 'assistant', calls.n, calls.n > 0 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.owed -%}{{- raise_exception('every tool call needs its tool message') -}}{%- endif -%}"
    "{%- if ns.last == 'assistant' and not ns.open -%}{%- set ns.out = ns.out + ' ' + eos_token -%}{%- endif -%}"
    "{{- ns.out -}}"
)


CHAT_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")  # the Llama 2 chat format's tags

class TokenizerLike(Protocol):
    """What the chat format and generation need of a tokenizer (Tokenizer provides it; tests may pass stubs)."""

    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def piece_bytes(piece: str) -> bytes:
    """A SentencePiece piece's bytes as it reads inside a text: a byte-fallback piece <0xNN> is that byte, and
    U+2581 is a space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8")


def decode_after(tokenizer: TokenizerLike, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text of `ids` as it reads after `context` (decoded together, the context's text cut off): a first
    piece's leading space, which SentencePiece drops at the start of a text, is kept, so context text + this is
    the whole. Falls back to decoding `ids` alone where the context's text is not a prefix (it ended inside a
    multi-byte character)."""
    head = tokenizer.decode(list(context)).rstrip("\ufffd")
    whole = tokenizer.decode([*context, *ids])
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(list(ids))


def valid_text(text: str) -> str:
    """text with what is not valid UTF-8 replaced by U+FFFD: bytes that were not UTF-8 reach Python as lone
    surrogates (command-line arguments, files read with surrogateescape), which SentencePiece cannot take."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        if _escaped_bytes(text):
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return re.sub("[\ud800-\udfff]", "\ufffd", text)


def _escaped_bytes(text: str) -> bool:
    """Whether every lone surrogate of text is an escaped byte (U+DC80..U+DCFF), so the bytes can be restored."""
    return all(0xDC80 <= ord(c) <= 0xDCFF for c in text if 0xD800 <= ord(c) <= 0xDFFF)


def _resolve_model_file(path: Path | str) -> Path:
    """The tokenizer.model of a file, a directory, or a training run / its `latest` pointer (the latest
    checkpoint's)."""
    p = Path(path)
    if not (p / MODEL_FILE).is_file():
        p = resolve_checkpoint(p)
    if p.is_dir():
        p = p / MODEL_FILE
        if not p.is_file():
            raise Llama2Error(f"no {MODEL_FILE} in directory {p}; point at a tokenizer.model file, a directory "
                              f"holding one or a training run (train one with `llama2 tokenizer train`)")
    elif not p.is_file():
        raise Llama2Error(f"tokenizer not found: {path} does not exist; give a tokenizer.model file or its directory")
    return p


class Tokenizer:
    """A SentencePiece tokenizer.model (Llama 2 style: BPE, byte fallback, unk 0 / bos 1 / eos 2, no pad)."""

    def __init__(self, path: Path | str):
        self.model_path = _resolve_model_file(path)
        size = self.model_path.stat().st_size
        if size > MAX_MODEL_BYTES:  # e.g. a weights file passed by mistake: do not read gigabytes
            raise Llama2Error(f"{self.model_path} is {size / 2**20:.0f} MiB, too large to be a SentencePiece "
                              f"tokenizer.model; point at the tokenizer, not the weights")
        self._bytes = self.model_path.read_bytes()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self._bytes)
        except (RuntimeError, OSError) as e:
            raise Llama2Error(f"{self.model_path} is not a valid SentencePiece tokenizer.model "
                              f"(corrupt or another format): {str(e).strip()[:200]}") from None
        self.sha256 = hashlib.sha256(self._bytes).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """SentencePiece's pad id: -1 (none) for Llama 2."""
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def tag_ids(self) -> tuple[int, ...]:
        """The ids of the chat tags that this vocabulary holds as single pieces (a tokenizer trained with them
        reserved); none for Meta's Llama 2 tokenizer, which spells them out of smaller pieces."""
        ids = (self.sp.piece_to_id(tag) for tag in CHAT_TAGS)
        return tuple(i for i in ids if i != self.sp.unk_id())

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text, with BOS first / EOS last as asked. Special tags in text are plain text."""
        if not isinstance(text, str):
            raise Llama2Error(f"encode expects a str, got {type(text).__name__}")
        return self.sp.encode(valid_text(text), add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        """encode over many texts at once, in SentencePiece's thread pool."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise Llama2Error("encode_batch expects a list of str")
        threads = num_threads if num_threads is not None else (os.cpu_count() or 1)
        return self.sp.encode([valid_text(t) for t in texts], add_bos=bos, add_eos=eos, num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; control ids (BOS, EOS, ...) are skipped. An id outside the vocabulary is an error."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise Llama2Error(f"token id {bad[0]} is outside the vocabulary (0..{n - 1}); was the text encoded "
                              f"with a different tokenizer?")
        return self.sp.decode([i for i in ids if not self.sp.IsControl(i)])

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise Llama2Error(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.sp.IdToPiece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """Id of piece; unk_id for a piece not in the vocabulary (as SentencePiece does)."""
        return self.sp.PieceToId(piece)

    def hf_config(self) -> dict:
        """tokenizer_config.json fields for Hugging Face's LlamaTokenizer."""
        return {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": self.id_to_piece(self.bos_id),
            "eos_token": self.id_to_piece(self.eos_id),
            "unk_token": self.id_to_piece(self.unk_id),
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            # legacy: text after a special token gets SentencePiece's dummy prefix, as when Meta encodes each chat
            # turn separately ("<s>[INST]" -> <s> "▁[" "INST" ...). That matches Meta's chat_completion.
            "legacy": True,
            "add_prefix_space": None,
            "model_max_length": MODEL_MAX_LENGTH,
            "clean_up_tokenization_spaces": False,
            "padding_side": "right",
            "sp_model_kwargs": {},
            "chat_template": LLAMA2_CHAT_TEMPLATE,
        }

    def save(self, directory: Path | str) -> Path:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into directory (atomically)."""
        d = make_dir(directory, "tokenizer directory")
        cfg = self.hf_config()
        special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token")}
        atomic_write_bytes(d / MODEL_FILE, self._bytes)
        atomic_write_bytes(d / CONFIG_FILE, (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode())
        atomic_write_bytes(d / SPECIAL_TOKENS_FILE, (json.dumps(special, indent=2, ensure_ascii=False) + "\n").encode())
        return d


def save_model_bytes(data: bytes, output: Path | str) -> Tokenizer:
    """Write a serialized model as output/tokenizer.model plus the Hugging Face files; return it loaded."""
    try:  # validate before anything is written, so a bad vocabulary never replaces a good file
        spm.SentencePieceProcessor().LoadFromSerializedProto(data)
    except RuntimeError as e:
        raise Llama2Error(f"the rebuilt SentencePiece model is invalid: {str(e).strip()[:300]}") from None
    out = make_dir(output)
    atomic_write_bytes(out / MODEL_FILE, data)
    tok = Tokenizer(out)
    tok.save(out)
    return tok


# ---------------------------------------------------------------------------------------------------------------
# GGUF import


def _gguf_field(reader, key: str, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise Llama2Error(f"GGUF file has no {key!r} field; it carries no SentencePiece vocabulary")
        return None
    return field.contents()


def tokenizer_from_gguf(gguf_path: Path | str, output_dir: Path | str) -> Tokenizer:
    """Rebuild a SentencePiece tokenizer.model from a GGUF vocabulary (tokenizer.ggml.tokens/scores/token_type)
    and save it with the Hugging Face config into output_dir."""
    from gguf import GGUFReader  # gguf and the protobuf model schema (~55 ms) only for a GGUF import
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(gguf_path)
    if not path.is_file():
        raise Llama2Error(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise Llama2Error(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/struct errors on a foreign file
        raise Llama2Error(f"{path} is not a readable GGUF file: {str(e)[:200]}") from None

    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise Llama2Error(f"{path} has a {model!r} tokenizer; only SentencePiece vocabularies "
                          f"(tokenizer.ggml.model = 'llama') can become a tokenizer.model")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    scores = _gguf_field(reader, "tokenizer.ggml.scores", required=False)
    types = _gguf_field(reader, "tokenizer.ggml.token_type", required=False)
    n = len(tokens)
    scores = list(scores) if scores is not None else [0.0] * n
    types = list(types) if types is not None else [1] * n
    if len(scores) != n or len(types) != n:
        raise Llama2Error(f"{path}: tokens, scores and token_type have different lengths "
                          f"({n}, {len(scores)}, {len(types)})")
    ids = {name: _gguf_field(reader, f"tokenizer.ggml.{name}_token_id", required=False)
           for name in ("unknown", "bos", "eos")}
    expect = {"unknown": 0, "bos": 1, "eos": 2}
    for name, want in expect.items():
        if ids[name] is not None and int(ids[name]) != want:
            raise Llama2Error(f"{path}: {name} token id is {ids[name]}, but a Llama 2 tokenizer needs unk 0, "
                              f"bos 1, eos 2")
    add_space = _gguf_field(reader, "tokenizer.ggml.add_space_prefix", required=False)

    proto = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        sp = proto.pieces.add()
        sp.piece = piece
        sp.score = float(score)
        # GGUF token types use SentencePiece's numbering: 1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte
        sp.type = int(kind) if int(kind) in (1, 2, 3, 4, 5, 6) else 1
    if n < 3 or proto.pieces[0].type != 2 or proto.pieces[1].type != 3 or proto.pieces[2].type != 3:
        raise Llama2Error(f"{path}: the first three tokens must be unknown, control, control (unk, bos, eos)")
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = True
    ts.split_digits = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece = tokens[0], tokens[1], tokens[2]
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True if add_space is None else bool(add_space)
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True

    return save_model_bytes(proto.SerializeToString(), output_dir)


def encode_continuation(tokenizer: TokenizerLike, text: str) -> list[int]:
    """The ids of `text` as it continues a text already encoded (no BOS, and no dummy-prefix space: SentencePiece
    adds one at the start of a text, never inside it): encoded after a newline, which no piece spans, and the
    newline's ids cut off."""
    head = tokenizer.encode("\n", bos=False)
    ids = tokenizer.encode("\n" + text, bos=False)
    return ids[len(head):] if ids[:len(head)] == head else tokenizer.encode(text, bos=False)
