"""An interactive chat session, kept apart from the terminal: dialogue history, context trimming, the slash
commands, and the read-answer loop over injectable I/O (so it is testable without a terminal or a model).

Decisions (also in README "Chat"):
- An answer stopped with Ctrl-C is kept as the assistant turn (the model remembers what the user saw); if it
  was stopped before any text arrived, the user message is dropped too.
- When prompt + max_new_tokens exceeds the context, the oldest (user, assistant) pairs are dropped for good
  (the system prompt is kept) and a note says how many. A single message that does not fit is refused with a
  message and the history is left as it was.
- Non-interactive mode (stdin not a terminal): one user message per input line, one answer per output line.
  Newlines in an answer are escaped: backslash -> ``\\\\``, newline -> ``\\n``, carriage return -> ``\\r``.
  Blank lines and commands print nothing; a line that cannot be answered prints an empty line (and a note on
  stderr), so output line i always answers the i-th non-blank, non-command input line.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TextIO

from .chat import Message, answer_messages, encode_dialog
from .errors import Llama2Error

if TYPE_CHECKING:
    from .tokenizer import TokenizerLike

HELP = ("commands: /reset (clear the history, keep the system prompt), /system TEXT (set the system prompt "
        "and reset), /exit or Ctrl-D (quit); Ctrl-C stops an answer; start a message with // to send a "
        "leading /")


@dataclass
class Prepared:
    """A prompt ready to answer: its tokens and how many old (user, assistant) pairs were dropped to fit."""

    tokens: list[int]
    dropped: int


@dataclass
class ChatSession:
    """Dialogue state: an optional system prompt and the completed (user, assistant) pairs."""

    tokenizer: TokenizerLike
    max_seq_len: int
    max_new_tokens: int
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    tools: list | None = None  # ToolSpecs listed to the model (llama2.tools); its answers keep their calls

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise Llama2Error(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_new_tokens >= self.max_seq_len:
            raise Llama2Error(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {self.max_seq_len} tokens; choose --max-new-tokens below "
                              f"{self.max_seq_len}")

    def messages(self, user: str | None = None, history: list[tuple[str, str]] | None = None) -> list[Message]:
        """The dialogue as messages, optionally ending with a new user message."""
        out: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in self.history if history is None else history:
            out += [{"role": "user", "content": u}, *answer_messages(a)]
        if user is not None:
            out.append({"role": "user", "content": user})
        return out

    def prepare(self, user: str) -> Prepared:
        """Encode the dialogue plus ``user``, dropping the oldest pairs until prompt + max_new_tokens fits."""
        history = list(self.history)
        dropped = 0
        while True:
            tokens = encode_dialog(self.tokenizer, self.messages(user, history), tools=self.tools)
            if len(tokens) + self.max_new_tokens <= self.max_seq_len:
                break
            if not history:
                what = "this message with the system prompt" if self.system else "this message"
                raise Llama2Error(f"message too long: {what} is {len(tokens)} tokens and {self.max_new_tokens} "
                                  f"are reserved for the answer, but the context holds {self.max_seq_len}; "
                                  "shorten it, lower --max-new-tokens, or shorten the system prompt")
            history.pop(0)
            dropped += 1
        self.history = history
        return Prepared(tokens, dropped)

    def add_turn(self, user: str, answer: str) -> None:
        self.history.append((user, answer))

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()


@dataclass
class Command:
    """A parsed input line: kind is "message", "reset", "system", "exit", "help", "blank" or "unknown"."""

    kind: str
    text: str = ""


def parse_line(line: str) -> Command:
    stripped = line.strip()
    if not stripped:
        return Command("blank")
    if stripped.startswith("//"):
        return Command("message", stripped[1:])
    if not stripped.startswith("/"):
        return Command("message", stripped)
    name, _, rest = stripped.partition(" ")
    if name in ("/exit", "/quit"):
        return Command("exit")
    if name == "/reset":
        return Command("reset")
    if name == "/system":
        return Command("system", rest.strip())
    if name == "/help":
        return Command("help")
    return Command("unknown", name)


def escape_line(text: str) -> str:
    """One answer on one line: backslash, newline and carriage return become \\\\, \\n and \\r."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def unescape_line(line: str) -> str:
    """Inverse of ``escape_line``."""
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(line[i + 1], line[i:i + 2]))
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


class InterruptGuard:
    """SIGINT handling: while an answer is generated, the first Ctrl-C only asks the answer to stop (checked
    between tokens) and a second one raises KeyboardInterrupt at once; outside generation Ctrl-C raises
    KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.generating = False
        self.stop_requested = False

    def handler(self, signum: int, frame: object) -> None:
        if self.generating and not self.stop_requested:
            self.stop_requested = True
            return
        raise KeyboardInterrupt

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.handler)

    @contextmanager
    def answering(self) -> Iterator[None]:
        self.generating, self.stop_requested = True, False
        try:
            yield
        finally:
            self.generating = False


Responder = Callable[[list[int], int], Iterable[str]]  # (prompt tokens, answer index) -> text pieces


def run_chat(session: ChatSession, respond: Responder, *, read_line: Callable[[str], str], out: TextIO,
             err: TextIO, interactive: bool, guard: InterruptGuard | None = None, prompt: str = ">>> ") -> int:
    """The read-answer loop. ``read_line(prompt)`` returns a line or raises EOFError; ``respond`` streams an
    answer's text. Returns 0 at /exit or end of input."""
    guard = guard or InterruptGuard()
    answers = 0

    def note(msg: str) -> None:
        print(msg, file=out if interactive else err, flush=True)

    while True:
        try:
            line = read_line(prompt if interactive else "")
        except EOFError:
            if interactive:
                print(file=out, flush=True)
            return 0
        except KeyboardInterrupt:
            print(file=out, flush=True)
            note("(Ctrl-C; type /exit or press Ctrl-D to quit)")
            continue
        cmd = parse_line(line)
        if cmd.kind == "blank":
            continue
        if cmd.kind == "exit":
            return 0
        if cmd.kind == "reset":
            session.reset()
            note("(history cleared)")
            continue
        if cmd.kind == "system":
            session.set_system(cmd.text)
            note(f"(system prompt {'set' if cmd.text else 'removed'}; history cleared)")
            continue
        if cmd.kind == "help":
            note(HELP)
            continue
        if cmd.kind == "unknown":
            note(f"(unknown command {cmd.text}; {HELP})")
            continue
        try:
            prepared = session.prepare(cmd.text)
        except Llama2Error as e:
            note(f"(error: {e})")
            if not interactive:
                print(file=out, flush=True)
            continue
        if prepared.dropped:
            note(f"(context full: dropped the {prepared.dropped} oldest exchange(s) to make room)")
        answer, stopped = _stream_answer(respond(prepared.tokens, answers), out, interactive, guard)
        answers += 1
        if interactive:
            print(" [stopped]" if stopped else "", file=out, flush=True)
        else:
            print(escape_line(answer.strip()), file=out, flush=True)
        if answer.strip() or not stopped:
            session.add_turn(cmd.text, answer)


def _stream_answer(pieces: Iterable[str], out: TextIO, interactive: bool,
                   guard: InterruptGuard) -> tuple[str, bool]:
    """Consume the streamed pieces, echoing them in interactive mode. Returns (text, stopped by Ctrl-C)."""
    parts: list[str] = []
    stopped = False
    shown = False
    iterator = iter(pieces)
    try:
        with guard.answering():
            for piece in iterator:
                parts.append(piece)
                if interactive:
                    text = piece if shown else piece.lstrip()
                    if text:
                        out.write(text)
                        out.flush()
                        shown = True
                if guard.stop_requested:
                    stopped = True
                    break
    except KeyboardInterrupt:
        stopped = True
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return "".join(parts), stopped
