"""The Llama 2 chat format against Meta's chat_completion built by hand with raw SentencePiece, the training masks,
the chat session (history, trimming, commands), and `llama2 chat` through a pipe and a pseudo-terminal."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from llama2 import Llama2Error
from llama2.chat import (B_INST, B_SYS, E_INST, E_SYS, answer_start, encode_dialog, encode_dialog_for_training,
                         validate_dialog)
from llama2.chat_session import (ChatSession, InterruptGuard, escape_line, parse_line, run_chat, unescape_line)
from llama2.tokenizer import Tokenizer

USERS = ["Hello there, who are you?", "  What is 2 + 2?  ", "Tell me a story about a cat.\nMake it short.",
         "Thanks! Caf\u00e9 \U0001F600 ok"]
ANSWERS = ["I am a helpful assistant.", "\nIt is 4.  ", "Once upon a time, a cat sat.", "You are welcome \u00e9"]
SYSTEM = "You are a pirate.\nAlways answer briefly."


@pytest.fixture(scope="module")
def sp(sp_model_path):
    return spm.SentencePieceProcessor(model_file=str(sp_model_path))


def dialog(n_turns: int, system: bool, complete: bool) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for i in range(n_turns):
        msgs.append({"role": "user", "content": USERS[i]})
        if complete or i < n_turns - 1:
            msgs.append({"role": "assistant", "content": ANSWERS[i]})
    return msgs


def by_hand(sp, n_turns: int, system: bool, complete: bool) -> list[list[int]]:
    """Meta's chat_completion written out with raw SentencePiece: one id list per (pair or final) segment."""
    users = list(USERS[:n_turns])
    if system:
        users[0] = "<<SYS>>\n" + SYSTEM + "\n<</SYS>>\n\n" + users[0]
    segs = []
    for i, u in enumerate(users):
        if complete or i < n_turns - 1:
            segs.append([1] + sp.encode(f"[INST] {u.strip()} [/INST] {ANSWERS[i].strip()} ") + [2])
        else:
            segs.append([1] + sp.encode(f"[INST] {u.strip()} [/INST]"))
    return segs


def test_constants_are_metas():
    assert (B_INST, E_INST, B_SYS, E_SYS) == ("[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n")


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("n_turns", [1, 2, 3, 4])
def test_encode_dialog_matches_paper_formula(tok, sp, n_turns, system):
    ids = encode_dialog(tok, dialog(n_turns, system, complete=False))
    expected = [t for seg in by_hand(sp, n_turns, system, complete=False) for t in seg]
    assert ids == expected
    assert ids.count(1) == n_turns and ids.count(2) == n_turns - 1  # BOS/EOS are ids, one per segment


@pytest.mark.parametrize("messages,needle", [
    ([], "empty"),
    ([{"role": "system", "content": "s"}], "only a system message"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}], "message 0 has role 'assistant', expected 'user'"),
    ([{"role": "user", "content": "u"}, {"role": "user", "content": "v"}], "message 1 has role 'user', expected 'assistant'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "system", "content": "t"},
      {"role": "user", "content": "v"}], "message 2 has role 'system', expected 'assistant'"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "must end with a user message"),
    ([{"role": "bot", "content": "u"}], "unknown role 'bot'"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": "a [INST] b"}], "'[INST]'"),
    ([{"role": "user", "content": "a [/INST] b"}], "'[/INST]'"),
    ([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "u"}], "'<<SYS>>'"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "x <</SYS>>"},
      {"role": "user", "content": "v"}], "'<</SYS>>'"),
])
def test_encode_dialog_refusals(tok, messages, needle):
    with pytest.raises(Llama2Error) as e:
        encode_dialog(tok, messages)
    assert needle in str(e.value)


def test_training_dialog_must_end_with_assistant(tok):
    with pytest.raises(Llama2Error, match="must end with an assistant message"):
        encode_dialog_for_training(tok, dialog(2, False, complete=False))
    with pytest.raises(Llama2Error, match="train_on"):
        encode_dialog_for_training(tok, dialog(1, False, complete=True), train_on="everything")
    validate_dialog(dialog(2, True, complete=True), complete=True)  # accepted


def masked_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("n_turns", [1, 2, 4])
def test_training_mask_covers_exactly_the_answers(tok, sp, n_turns, system):
    msgs = dialog(n_turns, system, complete=True)
    segs = by_hand(sp, n_turns, system, complete=True)
    for train_on in ("all_assistant", "last_assistant"):
        ids, mask = encode_dialog_for_training(tok, msgs, train_on=train_on)
        assert ids == [t for seg in segs for t in seg]  # exactly Meta's tokens
        assert len(mask) == len(ids)
        runs = masked_runs(ids, mask)
        trained = range(n_turns) if train_on == "all_assistant" else [n_turns - 1]
        assert len(runs) == len(trained)
        for run, i in zip(runs, trained):
            assert run[-1] == 2  # the closing EOS is trained
            assert sp.decode(run[:-1]) == ANSWERS[i].strip() + " "
        # every untrained segment part decodes to its prompt: BOS + "[INST] user [/INST]"
        pos = 0
        for i, seg in enumerate(segs):
            seg_mask = mask[pos:pos + len(seg)]
            n_prompt = seg_mask.index(True) if True in seg_mask else len(seg)
            if i in trained:
                assert seg[0] == 1 and not seg_mask[0]
                assert sp.decode(seg[1:n_prompt]) == sp.decode(sp.encode(f"[INST] {msgs_user(msgs, i)} [/INST]"))
                assert all(seg_mask[n_prompt:])
            else:
                assert not any(seg_mask)
            pos += len(seg)


def msgs_user(msgs: list[dict], i: int) -> str:
    users = [m["content"] for m in msgs if m["role"] == "user"]
    if msgs[0]["role"] == "system":
        users[0] = B_SYS + msgs[0]["content"] + E_SYS + users[0]
    return users[i].strip()


def test_empty_answer_still_trains_its_eos(tok, sp):
    ids, mask = encode_dialog_for_training(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    assert ids == [1] + sp.encode("[INST] hi [/INST]  ") + [2]
    assert mask[-1] and not any(mask[:len(sp.encode("[INST] hi [/INST]")) + 1])


def test_mask_boundary_when_a_piece_crosses_it(sp_model_path, tmp_path):
    """A vocabulary with the piece "]▁the" merges the end of [/INST] with the answer: the tokens stay exactly
    SentencePiece's encoding of the whole pair, and the crossing piece (it carries answer text) is trained."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_model_path.read_bytes())
    piece = proto.pieces.add()
    piece.piece, piece.score, piece.type = "]\u2581the", 0.0, pb.ModelProto.SentencePiece.NORMAL
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    tok2 = Tokenizer(tmp_path)
    raw = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    pair = raw.encode("[INST] hello [/INST] the answer ")
    prompt = raw.encode("[INST] hello [/INST]")
    assert pair[:len(prompt)] != prompt  # the merge really crosses the boundary
    ids, mask = encode_dialog_for_training(tok2, [{"role": "user", "content": "hello"},
                                                  {"role": "assistant", "content": "the answer"}])
    assert ids == [1] + pair + [2]
    first = mask.index(True)
    assert raw.id_to_piece(ids[first]) == "]\u2581the"
    assert all(mask[first:]) and not any(mask[:first])
    assert "[INST] hello [/INST]".startswith(raw.decode(ids[1:first]))
    assert answer_start(tok2, "hello", pair) == first - 1


# ---------------------------------------------------------------------------------------------------------------
# ChatSession: history, trimming, commands


def test_session_drops_oldest_turns_to_fit(tok):
    max_new = 16
    full = [{"role": "system", "content": SYSTEM}] + [m for i in range(3) for m in
                                                       ({"role": "user", "content": USERS[i]},
                                                        {"role": "assistant", "content": ANSWERS[i]})]
    n_all = len(encode_dialog(tok, full + [{"role": "user", "content": USERS[3]}]))
    n_two = len(encode_dialog(tok, full[:1] + full[3:] + [{"role": "user", "content": USERS[3]}]))
    limit = n_two + max_new  # room for the last two exchanges only
    assert n_all + max_new > limit
    s = ChatSession(tok, max_seq_len=limit, max_new_tokens=max_new, system=SYSTEM)
    for i in range(3):
        s.add_turn(USERS[i], ANSWERS[i])
    prepared = s.prepare(USERS[3])
    assert prepared.dropped == 1
    assert s.history == [(USERS[1], ANSWERS[1]), (USERS[2], ANSWERS[2])]
    assert prepared.tokens == encode_dialog(tok, full[:1] + full[3:] + [{"role": "user", "content": USERS[3]}])
    assert len(prepared.tokens) + max_new <= limit
    # with everything fitting, nothing is dropped
    s2 = ChatSession(tok, max_seq_len=n_all + max_new, max_new_tokens=max_new, system=SYSTEM)
    for i in range(3):
        s2.add_turn(USERS[i], ANSWERS[i])
    assert s2.prepare(USERS[3]).dropped == 0 and len(s2.history) == 3


def test_session_refuses_a_message_too_long_and_keeps_history(tok):
    s = ChatSession(tok, max_seq_len=40, max_new_tokens=10)
    s.add_turn("hi", "hello")
    with pytest.raises(Llama2Error, match="message too long"):
        s.prepare("word " * 100)
    assert s.history == [("hi", "hello")]
    with pytest.raises(Llama2Error, match="max-new-tokens"):
        ChatSession(tok, max_seq_len=40, max_new_tokens=40)


def test_parse_line_and_escaping():
    assert parse_line("/reset").kind == "reset"
    assert (parse_line("/system  Be brief.").kind, parse_line("/system  Be brief.").text) == ("system", "Be brief.")
    assert parse_line("/exit").kind == "exit" and parse_line("   ").kind == "blank"
    assert parse_line("/nope").kind == "unknown"
    assert (parse_line("//etc/hosts").kind, parse_line("//etc/hosts").text) == ("message", "/etc/hosts")
    text = "a\\nb\nc\r\\\\"
    assert "\n" not in escape_line(text) and unescape_line(escape_line(text)) == text


class FakeModel:
    """Records each prompt and streams a canned answer."""

    def __init__(self, tok, answers):
        self.tok, self.answers, self.prompts = tok, list(answers), []

    def __call__(self, tokens, index):
        self.prompts.append(tokens)
        yield from self.answers[index]


def drive(session, respond, lines, interactive=False, guard=None):
    it = iter(lines)

    def read_line(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    rc = run_chat(session, respond, read_line=read_line, out=out, err=err, interactive=interactive, guard=guard)
    return rc, out.getvalue(), err.getvalue()


def test_run_chat_history_reset_system_and_line_mode(tok):
    fake = FakeModel(tok, [["One", "\nline"], ["Two"], ["Three\\"], ["Four"]])
    s = ChatSession(tok, max_seq_len=512, max_new_tokens=8)
    rc, out, err = drive(s, fake, ["first", "", "second", "/reset", "third", "/system Be a cat.", "/bogus",
                                   "fourth", "/exit", "never read"])
    assert rc == 0
    assert out.splitlines() == ["One\\nline", "Two", "Three\\\\", "Four"]
    assert unescape_line(out.splitlines()[0]) == "One\nline"
    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    a = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    assert fake.prompts == [
        encode_dialog(tok, [u("first")]),
        encode_dialog(tok, [u("first"), a("One\nline"), u("second")]),
        encode_dialog(tok, [u("third")]),
        encode_dialog(tok, [{"role": "system", "content": "Be a cat."}, u("fourth")]),
    ]
    assert "unknown command /bogus" in err


def test_run_chat_unanswerable_line_keeps_line_alignment(tok):
    fake = FakeModel(tok, [["A"], ["B"]])
    s = ChatSession(tok, max_seq_len=40, max_new_tokens=10)
    rc, out, err = drive(s, fake, ["hi", "word " * 100, "bad [INST] tag", "there"])
    assert out.split("\n") == ["A", "", "", "B", ""]
    assert "message too long" in err and "[INST]" in err


def test_run_chat_interrupt_keeps_partial_answer(tok):
    guard = InterruptGuard()

    def respond(tokens, index):
        prompts.append(tokens)
        if index == 0:
            yield "Partial"
            guard.handler(2, None)  # Ctrl-C arrives while generating
            yield " answer"
            yield " never shown"
        elif index == 1:
            guard.handler(2, None)  # stopped before any text: the exchange is dropped
            yield ""
        else:
            yield "Done"

    prompts = []
    s = ChatSession(tok, max_seq_len=512, max_new_tokens=8)
    rc, out, _ = drive(s, respond, ["one", "two", "three"], interactive=True, guard=guard)
    assert "Partial answer [stopped]" in out and "never shown" not in out and "Done" in out
    assert s.history == [("one", "Partial answer"), ("three", "Done")]
    assert prompts[2] == encode_dialog(tok, [{"role": "user", "content": "one"},
                                             {"role": "assistant", "content": "Partial answer"},
                                             {"role": "user", "content": "three"}])
    # outside generation Ctrl-C raises as usual; a second Ctrl-C during generation raises at once
    with pytest.raises(KeyboardInterrupt):
        guard.handler(2, None)
    with guard.answering():
        guard.handler(2, None)
        with pytest.raises(KeyboardInterrupt):
            guard.handler(2, None)


# ---------------------------------------------------------------------------------------------------------------
# `llama2 chat` end to end: a random transformers checkpoint plus the fixture tokenizer


LLAMA2 = str(Path(sys.executable).with_name("llama2"))


def make_checkpoint(path: Path, sp_model_path: Path, *, block_eos: bool, max_len: int, seed: int = 0):
    """A tiny random LlamaForCausalLM in the Hugging Face layout with the fixture tokenizer.model.

    block_eos: residual dimension 0 is a constant 10 (embedding column 0; no attention or MLP output writes to it),
    so after the final norm it is always positive, and lm_head's EOS row reads it with weight -1e4: EOS gets a
    logit around -8e4 and is never generated."""
    import torch

    from conftest import random_hf_llama

    model = random_hf_llama(seed, vocab_size=1000, max_position_embeddings=max_len)
    if block_eos:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 10.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[0].zero_()
                layer.mlp.down_proj.weight[0].zero_()
            model.lm_head.weight[2].zero_()
            model.lm_head.weight[2, 0] = -1e4
    model.save_pretrained(path)
    shutil.copy(sp_model_path, path / "tokenizer.model")
    return model


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new[:new.index(2)] if 2 in new else new


def test_chat_through_a_pipe_matches_transformers_greedy(tmp_path, sp_model_path, sp, tok):
    """Several messages in, one answer line each; the history and /reset give exactly the prompts of the chat
    format, and each answer is transformers' greedy continuation of that prompt."""
    ckpt = tmp_path / "ckpt"
    model = make_checkpoint(ckpt, sp_model_path, block_eos=False, max_len=256)
    lines = ["Hello there", "What is a class?", "/reset", "Hello there", "", "/system Be brief.", "Who are you?"]
    n = 12
    proc = subprocess.run([LLAMA2, "chat", str(ckpt), "--temperature", "0", "--max-new-tokens", str(n),
                           "--device", "cpu", "--dtype", "fp32"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answers = [unescape_line(x) for x in proc.stdout.split("\n")[:-1]]
    assert len(answers) == 4, proc.stdout

    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    a = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    dialogues = [[u("Hello there")], [u("Hello there"), a(answers[0]), u("What is a class?")], [u("Hello there")],
                 [{"role": "system", "content": "Be brief."}, u("Who are you?")]]
    for got, d in zip(answers, dialogues):
        expected = sp.decode(hf_greedy(model, encode_dialog(tok, d), n)).strip()
        assert got == expected
    assert answers[2] == answers[0]


def test_chat_line_mode_reports_a_message_too_long(tmp_path, sp_model_path, monkeypatch, capsys):
    """In-process through the CLI entry point (stdin a non-terminal stream): a message too long for the context
    is an empty answer line plus a note on stderr, and the session goes on."""
    from llama2.cli import main

    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, sp_model_path, block_eos=False, max_len=64)
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 80 + "\nhi\n"))
    assert main(["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu", "--quiet"]) == 0
    out, err = capsys.readouterr()
    lines = out.split("\n")
    assert len(lines) == 3 and lines[0] == "" and lines[2] == ""
    assert "message too long" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(ckpt), "--max-new-tokens", "64", "--device", "cpu", "--quiet"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err


def test_chat_notes_an_answer_cut_at_max_new_tokens(tmp_path, sp_model_path, monkeypatch, capsys):
    """An answer that hits --max-new-tokens (EOS blocked) gets a note on stderr; stdout keeps one line per answer."""
    from llama2.cli import main

    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, sp_model_path, block_eos=True, max_len=64)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nagain\n"))
    assert main(["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "3", "--device", "cpu", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split("\n")) == 3 and out.split("\n")[0] != ""
    assert err.count("answer cut at --max-new-tokens 3") == 2


def test_chat_interactive_streams_and_ctrl_c_stops_an_answer(tmp_path, sp_model_path):
    pexpect = pytest.importorskip("pexpect")
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, sp_model_path, block_eos=True, max_len=8192)
    env = dict(os.environ, TERM="dumb")
    child = pexpect.spawn(LLAMA2, ["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "8000",
                                   "--device", "cpu", "--dtype", "fp32"], env=env, encoding="utf-8", timeout=60,
                          dimensions=(24, 200))
    try:
        child.expect("/exit")  # the banner
        child.expect_exact(">>> ")
        for message in ("Tell me a very long story", "And another one"):
            child.sendline(message)
            child.expect_exact(message)  # the terminal's echo
            child.expect(r"\S{4}")  # answer text streams in while the 8000-token answer is still being generated
            child.sendintr()
            child.expect_exact("[stopped]")
            child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("history cleared")
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
