"""The Llama 2 chat format (Meta's `chat_completion`) and the masks of trained tokens.

A dialogue is a list of ``{"role": ..., "content": ...}`` messages: an optional ``system`` message first, then
``user`` and ``assistant`` alternating. Each completed (user, assistant) pair becomes
``[bos] + encode(f"[INST] {user} [/INST] {answer} ") + [eos]``; a final user turn becomes
``[bos] + encode(f"[INST] {user} [/INST]")``. BOS and EOS are ids, never text.
"""

from __future__ import annotations

from typing import Literal, Sequence

from .errors import Llama2Error
from .tokenizer import CHAT_TAGS, TokenizerLike

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = CHAT_TAGS
ROLES = ("system", "user", "assistant")
# The same format as a Hugging Face chat template: llama2.tokenizer.LLAMA2_CHAT_TEMPLATE (tokenizer_config.json).

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
TrainOn = Literal["all_assistant", "last_assistant"]


def validate_dialog(messages: Sequence[Message], *, complete: bool) -> None:
    """Check roles, order and content. ``complete=False``: the dialogue must end with a user message (a prompt
    to answer); ``complete=True``: it must end with an assistant message (a training example)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise Llama2Error("dialogue is empty; give at least one user message "
                          "(a list of {'role': ..., 'content': ...} objects)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise Llama2Error(f"dialogue message {i} must be an object with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise Llama2Error(f"dialogue message {i} has unknown role {role!r}; use one of {list(ROLES)}")
        if not isinstance(content, str):
            raise Llama2Error(f"dialogue message {i} ({role}) content must be a string, got "
                              f"{type(content).__name__}")
        for tag in SPECIAL_TAGS:
            if tag in content:
                raise Llama2Error(f"dialogue message {i} ({role}) contains the reserved tag {tag!r}; "
                                  f"remove the tags {list(SPECIAL_TAGS)} from message text")
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise Llama2Error("dialogue has only a system message; add a user message after it")
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            where = " (a system message may only come first)" if messages[i]["role"] == "system" else ""
            raise Llama2Error(f"dialogue roles out of order: message {i} has role {messages[i]['role']!r}, "
                              f"expected {expected!r}{where}; after an optional system message, user and "
                              "assistant must alternate starting with user")
    last = messages[-1]["role"]
    if complete and last != "assistant":
        raise Llama2Error(f"training dialogue must end with an assistant message, but message "
                          f"{len(messages) - 1} is from the {last}; add the answer or drop the last message")
    if not complete and last != "user":
        raise Llama2Error(f"dialogue must end with a user message to answer, but message {len(messages) - 1} "
                          f"is from the {last}; add a user message")


def _turns(messages: Sequence[Message]) -> list[str]:
    """The contents after merging the system message into the first user message (Meta's rule)."""
    contents = [m["content"] for m in messages]
    if messages[0]["role"] == "system":
        contents = [B_SYS + contents[0] + E_SYS + contents[1]] + contents[2:]
    return contents


def prompt_text(user: str) -> str:
    return f"{B_INST} {user.strip()} {E_INST}"


def pair_text(user: str, answer: str) -> str:
    return f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "


def encode_dialog(tokenizer: TokenizerLike, messages: Sequence[Message]) -> list[int]:
    """Token ids of a dialogue ending with a user message, exactly as Meta's ``chat_completion`` builds them."""
    validate_dialog(messages, complete=False)
    turns = _turns(messages)
    ids: list[int] = []
    for user, answer in zip(turns[0:-1:2], turns[1::2]):
        ids += [tokenizer.bos_id] + tokenizer.encode(pair_text(user, answer), bos=False) + [tokenizer.eos_id]
    ids += [tokenizer.bos_id] + tokenizer.encode(prompt_text(turns[-1]), bos=False)
    return ids


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
                               train_on: TrainOn = "all_assistant") -> tuple[list[int], list[bool]]:
    """Tokens of a complete dialogue (ending with an assistant answer) and a mask of the trained tokens.

    The tokens are the concatenation of the pair encodings of ``encode_dialog``'s format. The mask is aligned
    with the tokens (not shifted): True exactly on each answer's text tokens and its closing EOS; False on BOS,
    the prompt and ``[/INST]``. ``train_on="last_assistant"`` marks only the final answer (Ghost Attention).
    """
    if train_on not in ("all_assistant", "last_assistant"):
        raise Llama2Error(f"train_on must be 'all_assistant' or 'last_assistant', got {train_on!r}")
    validate_dialog(messages, complete=True)
    turns = _turns(messages)
    pairs = list(zip(turns[0::2], turns[1::2]))
    ids: list[int] = []
    mask: list[bool] = []
    for j, (user, answer) in enumerate(pairs):
        pair_ids = tokenizer.encode(pair_text(user, answer), bos=False)
        start = answer_start(tokenizer, user, pair_ids)
        trained = train_on == "all_assistant" or j == len(pairs) - 1
        ids += [tokenizer.bos_id] + pair_ids + [tokenizer.eos_id]
        mask += [False] * (1 + start) + [trained] * (len(pair_ids) - start + 1)
    return ids, mask
