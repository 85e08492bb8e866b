"""The Llama 2 chat format (Meta's `chat_completion`) and the masks of trained tokens.

A dialogue is a list of ``{"role": ..., "content": ...}`` messages: an optional ``system`` message first, then
``user`` and ``assistant`` alternating. Each completed (user, assistant) pair becomes
``[bos] + encode(f"[INST] {user} [/INST] {answer} ") + [eos]``; a final user turn becomes
``[bos] + encode(f"[INST] {user} [/INST]")``. BOS and EOS are ids, never text.

Tool use (llama2.tools.format): an assistant message may carry ``tool_calls``, followed by one ``tool`` message
per call and the assistant message that goes on; together they make one answer, ``<call>...</call>`` and
``<result>...</result>`` inside it. The results are never trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Sequence

from .errors import Llama2Error
from .tokenizer import CHAT_TAGS, TokenizerLike, encode_continuation
from .tools.format import (CALL_CLOSE, CALL_OPEN, RESULT_CLOSE, RESULT_OPEN, as_spec, parse_call_block, result_text,
                           with_tools_prompt)

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = CHAT_TAGS
ROLES = ("system", "user", "assistant", "tool")
# The same format as a Hugging Face chat template: llama2.tokenizer.LLAMA2_CHAT_TEMPLATE (tokenizer_config.json).

Message = dict  # {"role": "system" | "user" | "assistant" | "tool", "content": str, "tool_calls": [...]}
TrainOn = Literal["all_assistant", "last_assistant"]

def answer_messages(answer: str) -> list[Message]:
    """An answer's text as the engine wrote it (calls, their results, the rest) back in OpenAI's message shape,
    so that a history holding it encodes to the same tokens: assistant messages with `tool_calls`, one `tool`
    message per result, and the final assistant message. A text without calls is one assistant message."""
    out: list[Message] = []
    rest = answer
    while (start := rest.find(CALL_OPEN)) >= 0 and (end := rest.find(CALL_CLOSE, start)) >= 0:
        try:
            calls = parse_call_block(rest[start + len(CALL_OPEN):end])
        except Llama2Error:
            break
        after = rest[end + len(CALL_CLOSE):]
        results = []
        while after.startswith("\n" + RESULT_OPEN) and (stop := after.find(RESULT_CLOSE)) >= 0:
            results.append(after[len(RESULT_OPEN) + 1:stop])
            after = after[stop + len(RESULT_CLOSE):]
        if len(results) != len(calls):
            break
        out.append({"role": "assistant", "content": rest[:start].strip(), "tool_calls": [
            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]})
        out += [{"role": "tool", "content": r} for r in results]
        rest = after.removeprefix("\n")
    return out + [{"role": "assistant", "content": rest}]


def validate_dialog(messages: Sequence[Message], *, complete: bool) -> None:
    """Check roles, order and content. ``complete=False``: the dialogue must end with a user message (a prompt
    to answer) or with tool results (the answer goes on after them); ``complete=True``: it must end with an
    assistant message (a training example)."""
    _group(messages, complete=complete)


def _message_text(m: Message, i: int) -> str:
    content = m.get("content")
    if content is None and m["role"] == "assistant" and m.get("tool_calls"):
        return ""
    if not isinstance(content, str):
        raise Llama2Error(f"dialogue message {i} ({m['role']}) content must be a string, got "
                          f"{type(content).__name__}")
    for tag in SPECIAL_TAGS:
        if tag in content:
            raise Llama2Error(f"dialogue message {i} ({m['role']}) contains the reserved tag {tag!r}; "
                              f"remove the tags {list(SPECIAL_TAGS)} from message text")
    return content


def _calls_text(m: Message, i: int) -> tuple[str, int]:
    """The call block of an assistant message's tool_calls (arguments given as a JSON string are kept verbatim,
    as the chat template writes them) and how many calls it holds."""
    calls = m.get("tool_calls")
    if not calls:
        return "", 0
    if not isinstance(calls, list):
        raise Llama2Error(f"dialogue message {i}: tool_calls must be a list")
    parts = []
    for c in calls:
        f = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise Llama2Error(f'dialogue message {i}: each tool call needs a function name ({{"function": '
                              f'{{"name": ..., "arguments": ...}}}})')
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                ok = isinstance(json.loads(args), dict)
            except json.JSONDecodeError:
                ok = False
        else:
            ok, args = isinstance(args, dict), json.dumps(args, ensure_ascii=False)
        if not ok:
            raise Llama2Error(f"dialogue message {i}: the arguments of tool call {f['name']!r} must be a JSON "
                              "object (or its text)")
        parts.append('{"name": ' + json.dumps(f["name"], ensure_ascii=False) + ', "arguments": ' + args + "}")
    body = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    return CALL_OPEN + body + CALL_CLOSE, len(parts)


@dataclass
class Turn:
    """A user turn, or an answer: pieces of text, each trained or not (tool results are not); `open` when it
    ends with tool results (the answer goes on after them)."""

    role: str
    pieces: list[tuple[str, bool]]
    open: bool = False

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


def _group(messages: Sequence[Message], *, complete: bool) -> list[Turn]:
    """The dialogue as alternating user turns and answers (the system message merged into the first user turn,
    Meta's rule), every message checked."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise Llama2Error("dialogue is empty; give at least one user message "
                          "(a list of {'role': ..., 'content': ...} objects)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise Llama2Error(f"dialogue message {i} must be an object with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise Llama2Error(f"dialogue message {i} has unknown role {m['role']!r}; use one of {list(ROLES)}")
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise Llama2Error("dialogue has only a system message; add a user message after it")
    turns: list[Turn] = []
    owed = 0  # tool results still owed to the last call block
    for i in range(start, len(messages)):
        m = messages[i]
        role, text = m["role"], _message_text(m, i)
        if role == "tool":
            if not owed:
                raise Llama2Error(f"dialogue message {i} is a tool result without a call before it; a tool "
                                  "message must follow an assistant message with tool_calls (one per call)")
            owed -= 1
            turns[-1].pieces.append((result_text(text, last=not owed), False))
            continue
        if owed:
            raise Llama2Error(f"dialogue message {i} ({role}) comes before the results of every tool call: give "
                              f"{owed} more tool message(s) first")
        if role == "assistant" and turns and turns[-1].open:  # the answer goes on after the tool results
            calls, owed = _calls_text(m, i)
            turns[-1].pieces.append((text.strip() + calls, True))
            turns[-1].open = bool(owed)
            continue
        expected = "user" if not turns or turns[-1].role == "assistant" else "assistant"
        if role != expected:
            where = " (a system message may only come first)" if role == "system" else ""
            raise Llama2Error(f"dialogue roles out of order: message {i} has role {role!r}, "
                              f"expected {expected!r}{where}; after an optional system message, user and "
                              "assistant must alternate starting with user")
        if role == "assistant":
            calls, owed = _calls_text(m, i)
            turns.append(Turn("assistant", [(text.strip() + calls, True)], open=bool(owed)))
        else:
            if turns:  # a user message closes the answer before it, tool results or not
                turns[-1].open = False
            if i == start == 1:
                text = B_SYS + _message_text(messages[0], 0) + E_SYS + text
            turns.append(Turn("user", [(text, False)]))
    if owed:
        raise Llama2Error(f"the dialogue ends with {owed} tool call(s) without results; add one tool message "
                          "per call")
    last, n = turns[-1], len(messages) - 1
    if complete and (last.role != "assistant" or last.open):
        raise Llama2Error(f"training dialogue must end with an assistant message, but message {n} is from the "
                          f"{messages[-1]['role']}; add the answer or drop the last message")
    if not complete and last.role == "assistant" and not last.open:
        raise Llama2Error(f"dialogue must end with a user message to answer, but message {n} is from the "
                          f"{messages[-1]['role']}; add a user message")
    return turns


def prompt_text(user: str) -> str:
    return f"{B_INST} {user.strip()} {E_INST}"


def pair_text(user: str, answer: str) -> str:
    return f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "


def encode_dialog(tokenizer: TokenizerLike, messages: Sequence[Message], tools: Sequence | None = None) -> list[int]:
    """Token ids of a dialogue ending with a user message (or with tool results, the answer to go on after
    them), exactly as Meta's ``chat_completion`` builds them. tools (ToolSpecs or OpenAI tool objects): listed at
    the start of the system message, as the chat template's `tools` are."""
    return _encode(tokenizer, _group(_with_tools(messages, tools), complete=False), "all_assistant")[0]


def _with_tools(messages: Sequence[Message], tools: Sequence | None) -> Sequence[Message]:
    if not tools:
        return messages
    return with_tools_prompt(list(messages), [as_spec(t) for t in tools])


def _encode(tokenizer: TokenizerLike, turns: list[Turn], train_on: TrainOn) -> tuple[list[int], list[bool]]:
    """Each completed (user, answer) pair: BOS, `[INST] user [/INST] answer `, EOS; a final user turn: BOS,
    `[INST] user [/INST]`; a final open answer: BOS, `[INST] user [/INST] ` and the answer so far. An answer with
    tool results is encoded piece by piece, each later piece as it continues the text (encode_continuation), as
    the engine appends results to what the model wrote; the results are not trained."""
    ids: list[int] = []
    mask: list[bool] = []
    for j in range(0, len(turns), 2):
        user, answer = turns[j].text, (turns[j + 1] if j + 1 < len(turns) else None)
        trained = train_on == "all_assistant" or j + 2 >= len(turns)
        if answer is None:
            prompt = [tokenizer.bos_id] + tokenizer.encode(prompt_text(user), bos=False)
            ids += prompt
            mask += [False] * len(prompt)
            break
        pieces = [(t, train) for t, train in answer.pieces if t] or [("", True)]
        if not answer.open:
            pieces[-1] = (pieces[-1][0] + " ", pieces[-1][1])
        first, first_trained = pieces[0]
        pair_ids = tokenizer.encode(f"{prompt_text(user)} {first}", bos=False)
        start = answer_start(tokenizer, user, pair_ids)
        ids += [tokenizer.bos_id] + pair_ids
        mask += [False] * (1 + start) + [trained and first_trained] * (len(pair_ids) - start)
        for text, train in pieces[1:]:
            more = encode_continuation(tokenizer, text)
            ids += more
            mask += [trained and train] * len(more)
        if not answer.open:
            ids.append(tokenizer.eos_id)
            mask.append(trained)
    return ids, mask


def answer_start(tokenizer: TokenizerLike, user: str, pair_ids: Sequence[int]) -> int:
    """Index in ``pair_ids`` (the encoding of ``pair_text(user, answer)``, no BOS/EOS) of the first answer token.

    Normally the encoding of ``prompt_text(user)`` alone is a prefix of the pair's encoding and the answer
    starts right after it. If a merge crosses the boundary (a piece holding the end of ``[/INST]`` and the
    start of the answer), the rule is: a token is a prompt token only if its text lies wholly inside the prompt
    text; the first token that carries any answer character starts the answer (so it is trained).
    """
    prompt_ids = tokenizer.encode(prompt_text(user), bos=False)
    n = len(prompt_ids)
    if list(pair_ids[:n]) == prompt_ids:
        return n
    k = 0
    while k < min(n, len(pair_ids)) and pair_ids[k] == prompt_ids[k]:
        k += 1
    prompt = tokenizer.decode(prompt_ids)
    while k < len(pair_ids) and prompt.startswith(tokenizer.decode(list(pair_ids[:k + 1]))):
        k += 1
    return k


def encode_dialog_for_training(tokenizer: TokenizerLike, messages: Sequence[Message], *,
                               train_on: TrainOn = "all_assistant", tools: Sequence | None = None
                               ) -> tuple[list[int], list[bool]]:
    """Tokens of a complete dialogue (ending with an assistant answer) and a mask of the trained tokens.

    The tokens are ``encode_dialog``'s format with every pair completed. The mask is aligned with the tokens (not
    shifted): True exactly on each answer's text tokens (its tool calls too, never its tool results) and its
    closing EOS; False on BOS, the prompt and ``[/INST]``. ``train_on="last_assistant"`` marks only the final
    answer (Ghost Attention). tools: as in encode_dialog.
    """
    if train_on not in ("all_assistant", "last_assistant"):
        raise Llama2Error(f"train_on must be 'all_assistant' or 'last_assistant', got {train_on!r}")
    return _encode(tokenizer, _group(_with_tools(messages, tools), complete=True), train_on)
