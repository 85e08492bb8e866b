"""The OpenAI wire format: request bodies checked into engine requests, and response objects and chunks.

Checks name the offending field (`param`) and answer in OpenAI's error shape with the right status: a bad field
400, an unknown model 404. Unsupported options that would change the output (suffix, best_of > n, the legacy
functions) are refused rather than ignored. Tools (chat only): `tools` are listed to the model in the system
message (llama2.tools.format); an answer that ends in a call block comes back as `tool_calls` with finish_reason
"tool_calls", for the client to run and answer with `role: tool` messages; tool_choice required or a named
function constrains the answer to such a call (a grammar over the tools' schemas). Structured output
(`response_format` json_object / json_schema, and vLLM's `guided_regex` / `guided_grammar`) becomes a Grammar the
engine enforces (llama2.inference.grammar).

Text joins: a completion's text is what decoding prompt + completion adds to the prompt's text (a first token's
leading space kept), and each logprobs entry's token text is its piece as it reads there, so the texts of the
tokens concatenate to the text and `text_offset` indexes it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..chat import encode_dialog
from ..errors import Llama2Error
from ..inference.grammar import Grammar
from ..inference.sampling import SamplingParams
from ..tokenizer import piece_bytes
from ..tools import CALL_CLOSE, CALL_OPEN, ToolSpec, as_specs, split_calls

MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Defaults:
    """Sampling used when a request leaves a field out (the server's --temperature etc.)."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    max_tokens: int = 256


@dataclass
class Job:
    """A checked request: the prompts (token ids), one SamplingParams per engine request (len(prompts) * n, in
    choice order), and how to answer."""

    kind: str  # "chat" or "completion"
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    n: int
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    echo: bool = False
    top_logprobs: int = 0
    tools: ToolUse | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# ----------------------------------------------------------------------------------------------- field checks


def _number(body: dict, name: str, lo: float, hi: float, default: float, *, open_lo: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise bad(f"{name} must be a number, got {v!r}", name)
    if v < lo or v > hi or (open_lo and v == lo):
        raise bad(f"{name} must be in {'(' if open_lo else '['}{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int | None, default: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer, got {v!r}", name)
    if v < lo or (hi is not None and v > hi):
        raise bad(f"{name} must be in {lo}..{hi if hi is not None else ''}, got {v}", name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {v!r}", name)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad(f"stop must be a non-empty string or a list of them, got {v!r}", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return stops


def _refuse_unsupported(body: dict, chat: bool = False) -> None:
    if body.get("functions") or body.get("function_call"):
        raise bad("the legacy functions / function_call fields are not supported; use tools and tool_choice",
                  "functions")
    if not chat and (body.get("tools") or body.get("tool_choice")):
        raise bad("tools are for /v1/chat/completions", "tools")
    best_of = body.get("best_of")
    if best_of not in (None, 1) and best_of != body.get("n", 1):
        raise bad("best_of is not supported by this server (only best_of == n)", "best_of")
    if body.get("suffix"):
        raise bad("suffix (insertion) is not supported by this server", "suffix")



def _grammar(body: dict) -> Grammar | None:
    """The structured-output constraint of a request: response_format (text, json_object, json_schema) or the
    extensions guided_regex (a regular expression) and guided_grammar (a Lark grammar), at most one."""
    fmt = body.get("response_format")
    given = [name for name in ("guided_regex", "guided_grammar") if body.get(name) is not None]
    if fmt is not None and fmt != {"type": "text"}:
        given.insert(0, "response_format")
    if len(given) > 1:
        raise bad(f"give one output constraint, not {' and '.join(given)}", given[1])
    for name, kind in (("guided_regex", "regex"), ("guided_grammar", "lark")):
        if name in given:
            if not isinstance(body[name], str) or not body[name]:
                raise bad(f"{name} must be a non-empty string", name)
            return Grammar(kind, body[name])
    if not given:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return Grammar("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format json_schema needs json_schema.schema, a JSON Schema object",
                      "response_format")
        return Grammar("json_schema", json.dumps(schema))
    raise bad(f"response_format must be {{'type': 'text' | 'json_object' | 'json_schema'}}, got {fmt!r}",
              "response_format")


@dataclass
class ToolUse:
    """A chat request's tools: the specs listed to the model, tool_choice ("auto", "required", or the name of the
    one function to call) and whether several calls may come at once."""

    specs: list[ToolSpec]
    choice: str = "auto"
    parallel: bool = True


def _tool_use(body: dict) -> ToolUse | None:
    """The request's tools (None when it has none, or tool_choice is "none": then no call is made or parsed)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad("tools must be a list of {type: function, function: {name, description, parameters}}", "tools")
    try:
        specs = as_specs(tools)
    except Llama2Error as e:
        raise bad(str(e), "tools") from None
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad(f"parallel_tool_calls must be true or false, got {parallel!r}", "parallel_tool_calls")
    if choice is None or choice in ("auto", "required"):
        return ToolUse(specs, choice or "auto", parallel)
    if choice == "none":
        return None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        choice.get("type") == "function" and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise bad("tool_choice must be none, auto, required or {type: function, function: {name}}, got "
                  f"{choice!r}", "tool_choice")
    if name not in {s.name for s in specs}:
        raise bad(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return ToolUse(specs, name, parallel)


def call_grammar(use: ToolUse) -> Grammar:
    """The output must be one call block (tool_choice required or a named function): a call of one of the
    tools, or of the named one, with arguments that fit its schema (a list of such calls where parallel calls are
    allowed and no function is named)."""
    specs = use.specs if use.choice == "required" else [s for s in use.specs if s.name == use.choice]
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": s.name}, "arguments": _closed(s.parameters)},
                      "required": ["name", "arguments"], "additionalProperties": False} for s in specs]}
    schema = {"anyOf": [one, {"type": "array", "items": one, "minItems": 2}]} \
        if use.parallel and use.choice == "required" else one
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return Grammar("lark", f'start: " {CALL_OPEN}" call "{CALL_CLOSE}"\ncall: %json {json.dumps(schema)}')


def _closed(schema: dict) -> dict:
    """An arguments schema that admits only its listed properties, unless it says otherwise (as the toolbox
    checks arguments)."""
    return schema if "additionalProperties" in schema or not schema.get("properties") else \
        {**schema, "additionalProperties": False}


def tool_answer(text: str, use: ToolUse | None) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of a chat answer: the calls of a call block it ends with (the stop at `</call>` cut
    the tag), with ids, when they parse and name the request's tools; else the whole text as content."""
    if use is None:
        return text, None
    content, calls, _ = split_calls(text.removesuffix(CALL_CLOSE))
    names = {s.name for s in use.specs}
    if not calls or any(c.name not in names for c in calls):
        return text, None
    if not use.parallel:
        calls = calls[:1]
    return (content.strip() or None), [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]


def _model(body: dict, served: str, adapters: Collection[str]) -> tuple[str, str | None]:
    """The model a request names and the LoRA adapter it runs with (None: the base; omitted: the base)."""
    name = body.get("model")
    if name is None:
        return served, None
    if not isinstance(name, str):
        raise bad(f"model must be a string, got {name!r}", "model")
    if name == served:
        return name, None
    if name in adapters:
        return name, name
    also = f" and the adapters {', '.join(repr(a) for a in sorted(adapters))}" if adapters else ""
    raise ApiError(404, f"The model '{name}' does not exist; this server serves '{served}'{also}", param="model",
                   code="model_not_found")


def _content(m: dict, i: int) -> Any:
    """A message's text: a string, or the text parts of OpenAI's content-part list joined."""
    c = m.get("content")
    if isinstance(c, list):
        texts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    if c is None:
        raise bad(f"messages[{i}] has no content", f"messages[{i}].content")
    return c


def _budget(prompt_len: int, max_tokens: int | None, context: int, default: int, param: str) -> int:
    """Tokens to generate for a prompt: max_tokens when prompt + max_tokens fits the context, else a 400."""
    if max_tokens is not None and max_tokens > context:
        raise bad(f"max_tokens is too large: {max_tokens}; this model's context holds {context} tokens "
                  "(prompt and completion together)", "max_tokens", "max_tokens_too_large")
    if prompt_len >= context:
        raise bad(f"This model's maximum context length is {context} tokens, but the prompt is {prompt_len} "
                  "tokens (leaving no room for the completion); shorten the prompt", param,
                  "context_length_exceeded")
    if max_tokens is None:
        return min(default, context - prompt_len)
    if prompt_len + max_tokens > context:
        raise bad(f"This model's maximum context length is {context} tokens. However, you requested "
                  f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion); "
                  "shorten the prompt or lower max_tokens", "max_tokens", "context_length_exceeded")
    return max_tokens


def _logit_bias(body: dict) -> dict[int, float] | None:
    v = body.get("logit_bias")
    if v is None or v == {}:
        return None
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        raise bad(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids, got {v!r}", "logit_bias")
    out = {}
    for key, bias in v.items():
        if not (isinstance(key, str) and key.isdigit()) or isinstance(bias, bool) or \
                not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad(f"logit_bias maps token ids (as strings) to numbers in [-100, 100]; {key!r}: {bias!r} is not "
                      "one", "logit_bias")
        out[int(key)] = float(bias)
    return out


def _sampling(body: dict, defaults: Defaults) -> dict:
    return dict(temperature=_number(body, "temperature", 0, 2, defaults.temperature),
                top_p=_number(body, "top_p", 0, 1, defaults.top_p, open_lo=True),
                top_k=_integer(body, "top_k", 0, None, defaults.top_k),
                stop=_stop(body), seed=_integer(body, "seed", -2**63, 2**63 - 1, None),
                presence_penalty=_number(body, "presence_penalty", -2, 2, 0.0),
                frequency_penalty=_number(body, "frequency_penalty", -2, 2, 0.0), logit_bias=_logit_bias(body))


def _expand(prompts: list[list[int]], base: dict, budgets: list[int], n: int) -> list[SamplingParams]:
    """n SamplingParams per prompt; with a seed s, choice i of a prompt samples with s + i (as Generator)."""
    out = []
    for budget in budgets:
        for i in range(n):
            seed = None if base["seed"] is None else base["seed"] + i
            out.append(SamplingParams(**{**base, "seed": seed, "max_new_tokens": budget}))
    return out


# --------------------------------------------------------------------------------------------- the requests


def parse_chat(body: Any, tokenizer, *, served: str, context: int, defaults: Defaults,
               adapters: Collection[str] = ()) -> Job:
    """A /v1/chat/completions body as a Job (prompt in the Llama 2 chat format)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model, adapter = _model(body, served, adapters)
    _refuse_unsupported(body, chat=True)
    use = _tool_use(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    dialog = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            dialog.append({"role": role, "content": _content(m, i) if m.get("content") is not None else None,
                           "tool_calls": m["tool_calls"]})
        else:
            dialog.append({"role": role, "content": _content(m, i)})
    try:
        ids = encode_dialog(tokenizer, dialog, tools=use.specs if use else None)
    except Llama2Error as e:
        raise bad(str(e), "messages") from None
    n = _integer(body, "n", 1, MAX_N, 1)
    logprobs = _bool(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    if top and not logprobs:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", 1, None, None)
    budget = _budget(len(ids), max_tokens, context, defaults.max_tokens, "messages")
    base = _sampling(body, defaults)
    grammar = _grammar(body)
    if use is not None:
        if grammar is not None and use.choice != "auto":
            raise bad("give tool_choice required (or a named function) or an output format, not both",
                      "tool_choice")
        base["stop"] = base["stop"] + [CALL_CLOSE]  # a call ends the answer: the client runs the tools
        if use.choice != "auto":
            grammar = call_grammar(use)
    base.update(logprobs=logprobs, top_logprobs=top, grammar=grammar, adapter=adapter)
    stream, usage = _stream_flags(body)
    return Job("chat", model, [ids], _expand([ids], base, [budget], n), n, stream, usage, logprobs,
               top_logprobs=top, tools=use)


def parse_completion(body: Any, tokenizer, *, served: str, context: int, defaults: Defaults,
               adapters: Collection[str] = ()) -> Job:
    """A /v1/completions body as a Job (text prompts are encoded with BOS)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model, adapter = _model(body, served, adapters)
    _refuse_unsupported(body)
    prompts = _prompts(body.get("prompt"), tokenizer)
    n = _integer(body, "n", 1, MAX_N, 1)
    if n * len(prompts) > MAX_N:
        raise bad(f"n x prompts is at most {MAX_N}, got {n} x {len(prompts)}", "n")
    lp = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
    echo = _bool(body, "echo")
    max_tokens = _integer(body, "max_tokens", 0, None, None)
    if max_tokens == 0 and not echo:
        raise bad("max_tokens must be >= 1 (0 only with echo)", "max_tokens")
    budgets = [_budget(len(p), max_tokens, context, defaults.max_tokens, "prompt") for p in prompts]
    base = _sampling(body, defaults)
    base.update(logprobs=lp is not None, echo=echo, top_logprobs=lp or 0, grammar=_grammar(body), adapter=adapter)
    stream, usage = _stream_flags(body)
    return Job("completion", model, prompts, _expand(prompts, base, budgets, n), n, stream, usage, lp is not None,
               echo, lp or 0)


def _prompts(v: Any, tokenizer) -> list[list[int]]:
    vocab = getattr(tokenizer, "vocab_size", None)

    def ids(x: list) -> list[int]:
        if not x or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x):
            raise bad("a token-id prompt must be a non-empty list of non-negative integers", "prompt")
        if vocab is not None and max(x) >= vocab:
            raise bad(f"token id {max(x)} is outside the vocabulary (0..{vocab - 1})", "prompt")
        return list(x)

    if isinstance(v, str):
        return [tokenizer.encode(v, bos=True)]
    if isinstance(v, list) and v:
        if all(isinstance(x, str) for x in v):
            return [tokenizer.encode(x, bos=True) for x in v]
        if all(isinstance(x, int) for x in v):
            return [ids(v)]
        if all(isinstance(x, list) for x in v):
            return [ids(x) for x in v]
    raise bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    if not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    return stream, _bool(opts, "include_usage")


# ------------------------------------------------------------------------------------------------ responses


FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes as OpenAI's logprobs list them (SentencePiece's ▁ is a space; a
    byte-fallback piece <0xNN> is that byte)."""
    piece = tokenizer.id_to_piece(token) if hasattr(tokenizer, "id_to_piece") else tokenizer.decode([token])
    if getattr(tokenizer, "sp", None) is not None and tokenizer.sp.IsControl(token):
        return "", []
    b = piece_bytes(piece)
    return b.decode("utf-8", errors="replace"), list(b)


def _top_dict(tokenizer, row: list[tuple[int, float]]) -> dict[str, float]:
    """{text: logprob} of a position's alternatives, best first (of two with the same text, the better)."""
    out: dict[str, float] = {}
    for t, lp in row:
        out.setdefault(token_text(tokenizer, t)[0], lp)
    return out


def chat_logprobs(tokenizer, tokens: list[int], logprobs: list[float],
                  top: list[list[tuple[int, float]]] | None = None) -> dict:
    """OpenAI's chat `logprobs`: per token its text, logprob, UTF-8 bytes and top alternatives."""
    content = []
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        text, b = token_text(tokenizer, t)
        alts = [{"token": a, "logprob": v, "bytes": list(a.encode("utf-8"))}
                for a, v in ((token_text(tokenizer, x)[0], v) for x, v in (top[i] if top else []))]
        content.append({"token": text, "logprob": lp, "bytes": b, "top_logprobs": alts})
    return {"content": content}


def completion_logprobs(tokenizer, tokens: list[int], logprobs: list[float], *, echo: bool, offset: int = 0,
                        top: list[list[tuple[int, float]]] | None = None, at_start: bool = False) -> dict:
    """OpenAI's completion `logprobs`: tokens (their texts), token_logprobs, top_logprobs (a {text: logprob}
    per position, None for an echoed first token; None throughout when no alternatives were asked) and
    text_offset (where each token's text starts in the answer's text). at_start: the tokens begin the sequence
    (echo), where SentencePiece drops the first piece's leading space."""
    texts = [token_text(tokenizer, t)[0] for t in tokens]
    if echo or at_start:
        first = next((i for i, t in enumerate(texts) if t), None)
        if first is not None and texts[first].startswith(" "):
            texts[first] = texts[first][1:]
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    lps: list[float | None] = list(logprobs)
    if echo and lps:
        lps[0] = None  # the first prompt token has no context
    alts = None
    if top is not None:
        alts = [None if echo and i == 0 else _top_dict(tokenizer, row) for i, row in enumerate(top)]
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": alts, "text_offset": offsets}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
