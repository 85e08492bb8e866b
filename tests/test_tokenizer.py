"""Tokenizer tests against SentencePiece, llama.cpp's expected ids, llama.cpp's chat-template strings, Hugging Face
transformers (loading and templating only) and Meta's chat format (chat_completion)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import corpus_text
from sentencepiece import sentencepiece_model_pb2 as pb

from llama2.cli import main
from llama2.errors import Llama2Error
from llama2.tokenizer import LLAMA2_CHAT_TEMPLATE
from llama2.data.tokenizer_training import train_tokenizer
from llama2.tokenizer import Tokenizer, tokenizer_from_gguf

SAMPLES = ["Hello world", " Hello  world ", "", " ", "\n\n", "In 2023, 12345 people said: 'naïve café' 😀!",
           "Äpfel\tund Birnen", "日本語のテキスト", "[INST] <<SYS>> not special here </s> <s>"]


def llama_cpp_vocab_tests(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """The .inp/.out pairs, read as llama.cpp's tests/test-tokenizer-0.cpp reads them: the raw .inp split on
    "\\n__ggml_vocab_test__\\n" (no final empty piece after the last separator), one stripped .out line each;
    ids are without BOS."""
    raw = Path(f"{gguf_path}.inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt == -1:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    outputs = Path(f"{gguf_path}.out").read_bytes().decode("utf-8").splitlines()
    assert len(inputs) == len(outputs)
    return [(s, [int(t) for t in o.strip().split()]) for s, o in zip(inputs, outputs)]


@pytest.fixture(scope="module")
def gguf_tok(llama_vocab_gguf, tmp_path_factory) -> Tokenizer:
    return tokenizer_from_gguf(llama_vocab_gguf, tmp_path_factory.mktemp("gguf_tok"))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(corpus_text(150_000))
    return p


@pytest.fixture(scope="module")
def trained(corpus_file, tmp_path_factory) -> Tokenizer:
    return train_tokenizer([corpus_file], 700, tmp_path_factory.mktemp("trained"), quiet=True)


# --- the real Llama 2 vocabulary, rebuilt from GGUF --------------------------------------------------------------


def test_gguf_tokenizer_reproduces_llama_cpp_ids(llama_vocab_gguf, gguf_tok):
    cases = llama_cpp_vocab_tests(llama_vocab_gguf)
    assert len(cases) >= 40
    wrong = [(s, gguf_tok.encode(s, bos=False), ids) for s, ids in cases if gguf_tok.encode(s, bos=False) != ids]
    assert not wrong, wrong[:3]
    assert [gguf_tok.encode(s, bos=False) for s, _ in cases] == gguf_tok.encode_batch([s for s, _ in cases], bos=False)
    not_round_trip = [s for s, ids in cases if gguf_tok.decode(ids) != s]
    assert not not_round_trip, not_round_trip


def test_gguf_tokenizer_fields(gguf_tok):
    assert (gguf_tok.vocab_size, gguf_tok.unk_id, gguf_tok.bos_id, gguf_tok.eos_id, gguf_tok.pad_id) == \
        (32000, 0, 1, 2, -1)
    assert [gguf_tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert gguf_tok.piece_to_id("<0x0A>") == 13 and gguf_tok.piece_to_id("▁Hello") == 15043
    assert gguf_tok.encode("Hello world", eos=True) == [1, 15043, 3186, 2]
    proto = pb.ModelProto.FromString(gguf_tok.model_path.read_bytes())
    assert proto.trainer_spec.model_type == pb.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.name == "identity" and proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces
    # the Llama 2 vocabulary: unk, 2 control pieces, the 256 byte pieces in order, then normal pieces
    kind = pb.ModelProto.SentencePiece
    assert [p.type for p in proto.pieces] == [kind.UNKNOWN, kind.CONTROL, kind.CONTROL] + [kind.BYTE] * 256 + \
        [kind.NORMAL] * (32000 - 259)
    assert [p.piece for p in proto.pieces[3:259]] == [f"<0x{b:02X}>" for b in range(256)]


def write_vocab_gguf(model_file: Path, path: Path) -> Path:
    """A weightless GGUF holding a SentencePiece model's vocabulary, written with the gguf package."""
    import gguf

    proto = pb.ModelProto.FromString(model_file.read_bytes())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_gguf_round_trip_of_a_sentencepiece_model(sp_model_path, tmp_path):
    ref = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    tok = tokenizer_from_gguf(write_vocab_gguf(sp_model_path, tmp_path / "v.gguf"), tmp_path / "out")
    texts = SAMPLES + corpus_text(30_000).splitlines()[-100:]
    assert tok.encode_batch(texts) == [ref.encode(t, add_bos=True) for t in texts]
    assert [ref.id_to_piece(i) for i in range(ref.get_piece_size())] == \
        [tok.id_to_piece(i) for i in range(tok.vocab_size)]


def test_llama_cpp_tokenizes_like_us(llama_vocab_gguf, gguf_tok):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(llama_vocab_gguf), vocab_only=True, verbose=False)
    texts = SAMPLES + ["The quick brown fox.\nJumps over 1,000 lazy dogs!", "   leading and trailing   "]
    texts += corpus_text(60_000).split("\n\n")[:40]  # multi-line paragraphs of real text
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == gguf_tok.encode(text), text


def test_decode_skips_control_ids_and_rejects_foreign_ids(gguf_tok):
    text = "Hi there, 42 times."
    ids = gguf_tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert gguf_tok.decode(ids) == text
    assert gguf_tok.decode([1, 1] + ids[1:-1] + [2, 2]) == text
    with pytest.raises(Llama2Error, match="outside the vocabulary"):
        gguf_tok.decode([1, 32000])
    with pytest.raises(Llama2Error, match="outside the vocabulary"):
        gguf_tok.decode([-1])


# --- equivalence with raw SentencePiece ---------------------------------------------------------------------------


def test_matches_raw_sentencepiece(sp_model_path):
    ref = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    tok = Tokenizer(sp_model_path.parent)  # a directory holding tokenizer.model
    assert tok.model_path == sp_model_path
    assert tok.sha256 == hashlib.sha256(sp_model_path.read_bytes()).hexdigest()
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (1000, 0, 1, 2, -1)
    texts = SAMPLES + corpus_text(20_000).splitlines()[:200]
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_bos=True), text
        assert tok.encode(text, bos=False, eos=True) == ref.encode(text, add_eos=True), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text)), text
    assert tok.encode_batch(texts) == [ref.encode(t, add_bos=True) for t in texts]
    assert tok.encode_batch(texts, bos=False, eos=True) == [ref.encode(t, add_eos=True) for t in texts]
    for i in (0, 1, 2, 3, 500, 999):
        assert tok.id_to_piece(i) == ref.id_to_piece(i)
        assert tok.piece_to_id(ref.id_to_piece(i)) == i
    assert tok.piece_to_id("no such piece at all") == tok.unk_id


# --- Hugging Face layout and the chat template ---------------------------------------------------------------------

CONVERSATION = [  # llama.cpp's tests/test-chat-template.cpp conversation
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]


def llama_cpp_expected_jinja(llama_cpp_dir: Path, name: str) -> str:
    """expected_output_jinja of the named case in llama.cpp's tests/test-chat-template.cpp (C string unescaped)."""
    src = (llama_cpp_dir / "tests" / "test-chat-template.cpp").read_text(encoding="utf-8")
    start = src.index(f'/* .name= */ "{name}"')
    m = re.compile(r'/\* \.expected_output_jinja= \*/ "((?:[^"\\]|\\.)*)"').search(src, start)
    assert m, name
    return re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), e.group(1)), m.group(1))


def meta_chat_string(messages: list[dict]) -> str:
    """Meta's chat_completion, with BOS/EOS written as <s>/</s>."""
    b_inst, e_inst, b_sys, e_sys = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if messages[0]["role"] == "system":
        messages = [{"role": "user", "content": b_sys + messages[0]["content"] + e_sys + messages[1]["content"]},
                    *messages[2:]]
    out = "".join(f"<s>{b_inst} {u['content'].strip()} {e_inst} {a['content'].strip()} </s>"
                  for u, a in zip(messages[::2], messages[1::2]))
    if len(messages) % 2:
        out += f"<s>{b_inst} {messages[-1]['content'].strip()} {e_inst}"
    return out


@pytest.fixture(scope="module")
def hf_tok(gguf_tok, tmp_path_factory):
    from transformers import AutoTokenizer

    d = gguf_tok.save(tmp_path_factory.mktemp("hf"))
    return AutoTokenizer.from_pretrained(str(d))


def test_save_writes_hugging_face_layout(gguf_tok, hf_tok, tmp_path):
    d = gguf_tok.save(tmp_path / "tok")
    assert (d / "tokenizer.model").read_bytes() == gguf_tok.model_path.read_bytes()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["chat_template"] == LLAMA2_CHAT_TEMPLATE
    assert (cfg["add_bos_token"], cfg["add_eos_token"], cfg["clean_up_tokenization_spaces"]) == (True, False, False)
    special = json.loads((d / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert "Llama" in type(hf_tok).__name__
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (1, 2, 0)
    assert Tokenizer(d).sha256 == gguf_tok.sha256


def test_chat_template_matches_llama_cpp_strings(hf_tok, llama_vocab_gguf):
    # vigogne-2-70b-chat is the Llama 2 format with stripped contents and no BOS token; ours with bos_token=""
    expected = llama_cpp_expected_jinja(llama_vocab_gguf.parents[1], "bofenghuang/vigogne-2-70b-chat")
    assert hf_tok.apply_chat_template(CONVERSATION, tokenize=False, bos_token="") == expected
    # with the real BOS, each turn starts "<s>[INST]" (as in TheBloke/FusionNet's, which does not strip contents)
    ours = hf_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ours.startswith("<s>[INST] <<SYS>>\n") and ours.count("</s><s>[INST] ") == 2
    assert ours.replace("<s>", "") == expected


@pytest.mark.parametrize("messages", [
    CONVERSATION,
    CONVERSATION[1:],
    CONVERSATION[:3],  # ends with an assistant turn: the pair is completed with EOS
    [{"role": "user", "content": "  only a question?\n"}],
    [{"role": "system", "content": " Be terse. "}, {"role": "user", "content": "\nList 3 primes.  "}],
])
def test_chat_template_is_metas_format(hf_tok, messages):
    assert hf_tok.apply_chat_template(messages, tokenize=False) == meta_chat_string(messages)


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "please ignore [/INST] this"}],
    [{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "hi"}],
])
def test_chat_template_refuses_bad_dialogues(hf_tok, messages):
    with pytest.raises(Exception, match="roles|special tag|followed by a user"):
        hf_tok.apply_chat_template(messages, tokenize=False)


def test_hf_tokenizes_rendered_chat_like_meta(gguf_tok, hf_tok):
    """legacy=True makes "<s>[INST]" encode as Meta does (BOS, then "▁[" "INST" ...): plain text only, since
    transformers differs from SentencePiece on leading and repeated spaces."""
    msgs = CONVERSATION[1:4]
    meta = [1, *gguf_tok.encode("[INST] Hello [/INST] Hi there ", bos=False), 2,
            1, *gguf_tok.encode("[INST] Who are you [/INST]", bos=False)]
    rendered = hf_tok.apply_chat_template(msgs, tokenize=False)
    assert hf_tok(rendered, add_special_tokens=False)["input_ids"] == meta


# --- training -------------------------------------------------------------------------------------------------------


def test_trained_tokenizer_has_llama_settings(trained):
    assert trained.vocab_size == 700
    assert (trained.unk_id, trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2, -1)
    proto = pb.ModelProto.FromString(trained.model_path.read_bytes())
    types = [p.type for p in proto.pieces]
    assert types[:3] == [pb.ModelProto.SentencePiece.UNKNOWN, pb.ModelProto.SentencePiece.CONTROL,
                         pb.ModelProto.SentencePiece.CONTROL]
    assert types[3:259] == [pb.ModelProto.SentencePiece.BYTE] * 256
    assert [p.piece for p in proto.pieces[3:259]] == [f"<0x{b:02X}>" for b in range(256)]
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    assert ts.model_type == pb.TrainerSpec.BPE and ts.byte_fallback and ts.split_digits
    assert (ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces) == ("identity", True, False)
    # digits split: no piece holds two digits, and a number encodes digit by digit
    normal = [p.piece for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL]
    assert len(normal) == 700 - 259 and not [p for p in normal if sum(c.isdigit() for c in p) > 1]
    assert [trained.id_to_piece(i) for i in trained.encode("12345", bos=False)] == ["▁", "1", "2", "3", "4", "5"]


def test_trained_tokenizer_byte_fallback_round_trips(trained):
    for text in ["party 😀🎉 time", "Ωμέγα ☃", "  two  spaces\tand a tab\n"]:
        ids = trained.encode(text)
        assert trained.unk_id not in ids
        assert trained.decode(ids) == text
    pieces = [trained.id_to_piece(i) for i in trained.encode("😀", bos=False)]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # the saved directory is a full Hugging Face tokenizer directory
    d = trained.model_path.parent
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == LLAMA2_CHAT_TEMPLATE


def test_jsonl_input_trains_the_same_model_as_text(corpus_file, tmp_path):
    lines = [line for line in corpus_file.read_text().splitlines() if line]
    docs = [lines[i:i + 7] for i in range(0, len(lines), 7)]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": "\n".join(d), "id": k}) + "\n" for k, d in enumerate(docs)))
    txt = tmp_path / "plain.txt"
    txt.write_text("\n".join(lines) + "\n")
    a = train_tokenizer([txt], 400, tmp_path / "a", quiet=True)
    b = train_tokenizer([jsonl], 400, tmp_path / "b", quiet=True)
    assert a.model_path.read_bytes() == b.model_path.read_bytes()


def test_training_errors(corpus_file, tmp_path):
    with pytest.raises(Llama2Error, match="too large.*at most \\d+"):
        train_tokenizer([corpus_file], 50_000, tmp_path / "x", quiet=True)
    with pytest.raises(Llama2Error, match="too small"):
        train_tokenizer([corpus_file], 200, tmp_path / "x", quiet=True)
    with pytest.raises(Llama2Error, match="too small.*at least \\d+"):
        train_tokenizer([corpus_file], 265, tmp_path / "x", quiet=True)
    with pytest.raises(Llama2Error, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], 400, tmp_path / "x", quiet=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line"}\n{"txt": "no text field"}\n')
    with pytest.raises(Llama2Error, match=r"bad.jsonl:2: no \"text\""):
        train_tokenizer([bad], 400, tmp_path / "x", quiet=True)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(Llama2Error, match=r"broken.jsonl:1: not valid JSON"):
        train_tokenizer([tmp_path / "broken.jsonl"], 400, tmp_path / "x", quiet=True)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(Llama2Error, match="no usable text"):
        train_tokenizer([tmp_path / "empty.txt"], 400, tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()


RESERVED = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "Zebrafish"]


def test_reserved_strings_encode_as_one_piece_each(corpus_file, trained, tmp_path, capsys):
    """`llama2 tokenizer train --reserved`: SentencePiece itself (not our wrapper) encodes each reserved string as
    one piece, in the chat format and alone, where the same training without them splits every one; text still
    round-trips."""
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "500", "--output", str(out),
                 "--quiet", "--reserved", *RESERVED]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    plain = spm.SentencePieceProcessor(model_file=str(trained.model_path))
    assert sp.get_piece_size() == 500
    assert [sp.id_to_piece(i) for i in range(3, 3 + len(RESERVED))] == RESERVED  # after <unk> <s> </s>, in order
    chat = "[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nWhat is a Zebrafish? [/INST] A fish. "
    for r in RESERVED:
        assert r in sp.encode(chat, out_type=str) and sp.encode(r, out_type=str) == ["▁", r]
        assert r not in plain.encode(chat, out_type=str)  # without reserving, it is split
    for text in [chat, corpus_file.read_text()[:5000], "Zebrafishes and [INST]x[/INST]y  😀"]:
        assert sp.decode(sp.encode(text)) == text
        assert Tokenizer(out).decode(Tokenizer(out).encode(text)) == text
    # the chat tags held as single pieces are the generation engine's default stops; a vocabulary that spells
    # them out of smaller pieces (Meta's) has none
    assert Tokenizer(out).tag_ids == tuple(sp.piece_to_id(t) for t in ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"))
    assert Tokenizer(trained.model_path).tag_ids == ()


def test_a_chat_tag_piece_ends_a_completion(corpus_file, tmp_path):
    """With the chat tags reserved, a model that emits one has started a new turn: the default stop ends the
    completion there (the tag is not in the text), as EOS does; explicit stop_ids replace the default."""
    import torch

    from llama2.config import ModelConfig
    from llama2.inference.generate import Generator, SamplingParams
    from llama2.model import Transformer

    out = tmp_path / "tok"
    train_tokenizer([corpus_file], 500, out, reserved=RESERVED, quiet=True)
    tok = Tokenizer(out)
    inst = tok.tag_ids[0]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, max_seq_len=64)).eval()
    with torch.no_grad():  # the model's favourite next token, whatever the context: [INST]
        for block in model.layers:  # the residual stream is the (positive) token embedding alone
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.embed_tokens.weight.abs_()
        model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[inst] = 1.0
    gen = Generator(model, tok)
    done = gen.generate(["Hello"], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
    assert done.tokens == [] and "[INST]" not in done.text
    forced = gen.generate(["Hello"], SamplingParams(temperature=0.0, max_new_tokens=3, stop_ids=[tok.eos_id]))[0]
    assert forced.tokens == [inst] * 3


@pytest.mark.parametrize("reserved,match", [
    (["hello world"], "whitespace"),
    (["[INST]", "[INST]"], "twice"),
    (["<s>"], "special piece"),
    ([""], "non-empty"),
])
def test_reserved_errors(corpus_file, tmp_path, reserved, match):
    with pytest.raises(Llama2Error, match=match):
        train_tokenizer([corpus_file], 400, tmp_path / "x", reserved=reserved, quiet=True)


# --- loading errors and GGUF errors ----------------------------------------------------------------------------------


def test_loading_errors(tmp_path):
    with pytest.raises(Llama2Error, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(Llama2Error, match="no tokenizer.model in directory"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(Llama2Error, match="not a valid SentencePiece"):
        Tokenizer(tmp_path)


def test_gguf_errors(tmp_path):
    import gguf

    with pytest.raises(Llama2Error, match="not found"):
        tokenizer_from_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(Llama2Error, match="not a GGUF file"):
        tokenizer_from_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(Llama2Error, match="not a readable GGUF"):
        tokenizer_from_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(Llama2Error, match="'gpt2' tokenizer"):
        tokenizer_from_gguf(path, tmp_path / "out")


# --- command line ----------------------------------------------------------------------------------------------------


def test_cli_train_encode_decode(corpus_file, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "500",
                 "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "500 pieces" in captured.out and "reading text" in captured.err  # the progress bar
    tok = Tokenizer(out)
    assert tok.vocab_size == 500
    assert main(["tokenizer", "encode", str(out), "--text", "Hello 42"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in tok.encode("Hello 42")]
    assert main(["tokenizer", "decode", str(out), *map(str, tok.encode("Hello 42", eos=True))]) == 0
    assert capsys.readouterr().out == "Hello 42\n"
    assert main(["tokenizer", "train", "--input", str(corpus_file), "--vocab-size", "99999",
                 "--output", str(tmp_path / "big"), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "too large" in captured.err and "Traceback" not in captured.err and captured.out == ""


def test_cli_from_gguf_and_entry_point(sp_model_path, tmp_path, capsys):
    ref = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    out = tmp_path / "tok"
    assert main(["tokenizer", "from-gguf", str(write_vocab_gguf(sp_model_path, tmp_path / "v.gguf")),
                 "--output", str(out)]) == 0
    assert "1000 pieces" in capsys.readouterr().out
    exe = Path(sys.executable).with_name("llama2")  # the installed entry point, in a fresh process
    r = subprocess.run([str(exe), "tokenizer", "encode", str(out), "--text", "Hello world", "--pieces"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["<s>", *ref.encode("Hello world", out_type=str)]
    assert main(["tokenizer", "encode", str(tmp_path / "none"), "--text", "x"]) == 2
    assert capsys.readouterr().err.startswith("llama2: error: tokenizer not found")
    # bytes that are not UTF-8 on the command line: replaced by U+FFFD (SentencePiece encodes that), no traceback
    r = subprocess.run([str(exe), "tokenizer", "encode", str(out), "--text", b"caf\xc3\xa9 \xff!"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and b"Traceback" not in r.stderr
    assert r.stdout.decode().split() == [str(i) for i in [1, *ref.encode("caf\u00e9 \ufffd!")]]


def test_text_that_is_not_utf8_is_replaced_before_encoding(sp_model_path):
    """Escaped bytes (how Python hands undecodable argv bytes and surrogateescape reads over) are decoded as
    UTF-8 where they form it and replaced by U+FFFD where not; any other lone surrogate becomes U+FFFD.
    SentencePiece encoding the repaired text is the oracle."""
    ref = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    tok = Tokenizer(sp_model_path)
    raw = b"caf\xc3\xa9 \xff end"
    assert tok.encode(raw.decode("utf-8", "surrogateescape"), bos=False) == ref.encode("caf\u00e9 \ufffd end")
    assert tok.encode("a\ud800b", bos=False) == ref.encode("a\ufffdb")
    assert tok.encode_batch(["x\udcff"], bos=False) == [ref.encode("x\ufffd")]
