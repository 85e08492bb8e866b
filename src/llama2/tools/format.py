"""How tool calls are written in a Llama 2 chat dialogue.

Inside an assistant answer, the model calls tools by writing one JSON call, or a JSON list of calls made together
(parallel calls), between `<call>` and `</call>`:

    [INST] What is 4821 + 3967? [/INST] <call>{"name": "calculator", "arguments": {"expression": "4821 + 3967"}}</call>
    <result>8788</result>
    4821 + 3967 = 8788. </s>

Each call's result follows at once, in order, on a new line between `<result>` and `</result>` (written by
whoever runs the tool, never trained), and the answer goes on after the last one, on a new line, in the same
assistant turn. (No SentencePiece piece spans a newline, so the text appended to what the model wrote encodes
as it does inside the whole text: the chat template's ids equal the engine's.) The tools on offer are
listed in the system message (`tools_prompt`). In OpenAI's message shape this is an assistant message with
`tool_calls`, one `tool` message per call, and the assistant message that continues (see llama2.chat).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import Llama2Error

CALL_OPEN, CALL_CLOSE = "<call>", "</call>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
TAGS = (CALL_OPEN, CALL_CLOSE, RESULT_OPEN, RESULT_CLOSE)
TOOLS_INTRO = "You can call these tools:"
TOOLS_USAGE = 'Call one as <call>{"name": "...", "arguments": {...}}</call>.'


@dataclass
class ToolCall:
    """One call: the tool's name and its arguments (a JSON object); `id` as the OpenAI API names calls."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None
    result: str | None = None  # what the tool returned (text), once run
    error: bool = False  # the result is an error message
    malformed: bool = False  # not a call of an offered tool with arguments that fit it (not JSON, unknown tool, ...)


@dataclass
class ToolSpec:
    """A tool as the model is told about it: name, description and a JSON Schema of its arguments (an object)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def clean_result(text: str) -> str:
    """A tool's output made safe to embed: the format's tags are neutralised, so a result cannot open a call."""
    for tag in TAGS:
        text = text.replace(tag, tag.replace("<", "‹").replace(">", "›"))
    return text


def result_text(result: str, last: bool = True) -> str:
    """One call's result as the dialogue holds it; the last of a block's results ends the line."""
    return "\n" + RESULT_OPEN + clean_result(result) + RESULT_CLOSE + ("\n" if last else "")


def results_text(results: list[str]) -> str:
    """What follows a call block: each call's result in order."""
    return "".join(result_text(r, i == len(results) - 1) for i, r in enumerate(results))


def parse_call_block(body: str) -> list[ToolCall]:
    """The calls of a block's body (the text between `<call>` and `</call>`); Llama2Error naming what is wrong."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        raise Llama2Error(f"malformed call: not JSON: {body[:80]!r}") from None
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        raise Llama2Error("malformed call: an empty list of calls")
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise Llama2Error('malformed call: each call must be {"name": ..., "arguments": {...}}')
        args = item.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI's API does
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise Llama2Error(f"malformed call: the arguments of {item['name']!r} are not JSON") from None
        if not isinstance(args, dict):
            raise Llama2Error(f"malformed call: the arguments of {item['name']!r} must be a JSON object")
        calls.append(ToolCall(item["name"], args))
    return calls


def final_answer(text: str) -> str:
    """What an answer says after its last tool result (the whole text when it called nothing), without any call
    block left open or unanswered."""
    end = text.rfind(RESULT_CLOSE)
    tail = text[end + len(RESULT_CLOSE):] if end >= 0 else text
    start = tail.find(CALL_OPEN)
    return (tail if start < 0 else tail[:start]).strip()


def last_call_block(text: str) -> str | None:
    """The body of the call block `text` ends with (text ends with `</call>`), or None."""
    if not text.endswith(CALL_CLOSE):
        return None
    start = text.rfind(CALL_OPEN)
    return None if start < 0 else text[start + len(CALL_OPEN):-len(CALL_CLOSE)]


def split_calls(text: str) -> tuple[str, list[ToolCall] | None, str | None]:
    """(text before an unfinished call, its calls, an error) for a completion that stopped at `</call>` (so the
    close tag is not in `text`): the content before `<call>`, and the calls, or None and the parse error.
    Text without `<call>` gives (text, None, None)."""
    start = text.rfind(CALL_OPEN)
    if start < 0:
        return text, None, None
    try:
        return text[:start], parse_call_block(text[start + len(CALL_OPEN):]), None
    except Llama2Error as e:
        return text[:start], None, str(e)


def as_spec(tool: Any) -> ToolSpec:
    """A ToolSpec from OpenAI's shape ({"type": "function", "function": {...}}), the bare function object, or a
    ToolSpec; Llama2Error naming what is wrong."""
    if isinstance(tool, ToolSpec):
        return tool
    if not isinstance(tool, dict):
        raise Llama2Error(f"a tool must be an object, got {type(tool).__name__}")
    if "function" in tool:
        if tool.get("type", "function") != "function":
            raise Llama2Error(f"tool type {tool.get('type')!r} is not supported; only 'function'")
        tool = tool["function"]
    if not isinstance(tool, dict):
        raise Llama2Error("a tool's 'function' must be an object")
    name = tool.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise Llama2Error(f"tool name {name!r} must be letters, digits, _ or - (OpenAI's rule)")
    description = tool.get("description") or ""
    if not isinstance(description, str):
        raise Llama2Error(f"the description of tool {name!r} must be a string")
    params = tool.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict) or params.get("type", "object") != "object" or \
            not isinstance(params.get("properties", {}), dict):
        raise Llama2Error(f"the parameters of tool {name!r} must be a JSON Schema of an object "
                          '({"type": "object", "properties": {...}})')
    return ToolSpec(name, description, params)


def tools_prompt(tools: list[ToolSpec]) -> str:
    """The text that tells the model which tools it may call (the system message's start): one line per tool,
    `name(arg, ...): description`."""
    lines = [TOOLS_INTRO]
    for t in tools:
        line = f"{t.name}({', '.join(t.parameters.get('properties', {}))})"
        lines.append(f"{line}: {t.description.strip()}" if t.description.strip() else line)
    lines.append(TOOLS_USAGE)
    return "\n".join(lines)


def with_tools_prompt(messages: list[dict[str, Any]], tools: list[ToolSpec]) -> list[dict[str, Any]]:
    """The messages with the tools' text at the start of the system message (one is added when there is none)."""
    if not tools:
        return list(messages)
    text = tools_prompt(tools)
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": text + "\n\n" + (messages[0].get("content") or "")}] + list(messages[1:])
    return [{"role": "system", "content": text}] + list(messages)
