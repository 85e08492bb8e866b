"""Tools the engine can run: a name, a description, a JSON Schema of the arguments and a Python function.

`Toolbox.run(calls)` runs each call with a time limit; whatever goes wrong (an unknown tool, arguments that do
not fit the schema, an exception, a timeout) becomes the call's result as an error message for the model, so a
request never fails because of a tool. The built-in tools: `calculator` (exact arithmetic) and `search` (BM25
over a local corpus); any Python function can be registered (`tool_from_function`, or `module:function` in
`load_tools`, which reads its parameters from the signature).
"""

from __future__ import annotations

import importlib
import inspect
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import Llama2Error
from .calculator import calculate
from .format import ToolCall, ToolSpec, as_spec
from .search import Search

TIMEOUT_S = 5.0  # most seconds a call may take
MAX_RESULT_CHARS = 1000  # a longer result is cut (the engine also cuts it to what the context holds)
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
               "object": dict}
_PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass
class Tool:
    """A tool: what the model is told (spec) and the function that runs it. bounded: the function limits its own
    time and size (the built-in tools do), so it runs in the caller's thread, without the time limit's thread."""

    spec: ToolSpec
    fn: Callable[..., Any]
    bounded: bool = False

    @property
    def name(self) -> str:
        return self.spec.name


def calculator_tool() -> Tool:
    return Tool(ToolSpec("calculator", "exact arithmetic: + - * / and parentheses.",
                         {"type": "object", "properties": {"expression": {"type": "string"}},
                          "required": ["expression"]}), calculate, bounded=True)


def search_tool(documents: Sequence[str]) -> Tool:
    return Tool(ToolSpec("search", "find facts in the documents.",
                         {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}),
                Search(documents), bounded=True)


def tool_from_function(fn: Callable[..., Any], name: str | None = None, description: str | None = None) -> Tool:
    """A tool from a Python function: its parameters (annotated str/int/float/bool/list/dict, else string) become
    the schema, those without defaults required; the docstring's first line is the description."""
    props, required = {}, []
    try:
        params = inspect.signature(fn, eval_str=True).parameters.values()
    except (NameError, TypeError, ValueError):  # annotations that do not resolve: read as written
        params = inspect.signature(fn).parameters.values()
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        props[p.name] = {"type": _PY_TYPES.get(p.annotation, "string")}
        if p.default is p.empty:
            required.append(p.name)
    doc = (description if description is not None else (inspect.getdoc(fn) or "").split("\n")[0]).strip()
    return Tool(ToolSpec(name or fn.__name__, doc, {"type": "object", "properties": props, "required": required}),
                fn)


def check_arguments(spec: ToolSpec, args: dict[str, Any]) -> None:
    """Llama2Error unless args fit the spec's schema: required keys present, no unknown keys (where the schema
    lists properties), JSON types as declared, enum values respected."""
    props = spec.parameters.get("properties", {})
    for key in spec.parameters.get("required", []):
        if key not in args:
            raise Llama2Error(f"missing argument {key!r} for {spec.name}")
    for key, value in args.items():
        if key not in props:
            if props or spec.parameters.get("additionalProperties") is False:
                raise Llama2Error(f"{spec.name} has no argument {key!r} (it takes {', '.join(props) or 'none'})")
            continue
        want = props[key].get("type") if isinstance(props[key], dict) else None
        types = _JSON_TYPES.get(want) if isinstance(want, str) else None
        if types and (not isinstance(value, types) or (want in ("integer", "number") and isinstance(value, bool))):
            raise Llama2Error(f"argument {key!r} of {spec.name} must be of type {want}, got {json.dumps(value)[:40]}")
        enum = props[key].get("enum") if isinstance(props[key], dict) else None
        if enum is not None and value not in enum:
            raise Llama2Error(f"argument {key!r} of {spec.name} must be one of {enum}")


class Toolbox:
    """Named tools and how to run them (time limit `timeout_s` per call, results cut to `max_result_chars`)."""

    def __init__(self, tools: Sequence[Tool] = (), *, timeout_s: float = TIMEOUT_S,
                 max_result_chars: int = MAX_RESULT_CHARS) -> None:
        self.tools: dict[str, Tool] = {}
        self.timeout_s, self.max_result_chars = timeout_s, max_result_chars
        for t in tools:
            self.register(t)

    def register(self, tool: Tool | Callable[..., Any]) -> Tool:
        tool = tool if isinstance(tool, Tool) else tool_from_function(tool)
        if tool.name in self.tools:
            raise Llama2Error(f"two tools are named {tool.name!r}")
        self.tools[tool.name] = tool
        return tool

    @property
    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self.tools.values()]

    def __bool__(self) -> bool:
        return bool(self.tools)

    def run(self, calls: list[ToolCall]) -> list[ToolCall]:
        """Run each call (in order), setting its result (text) and whether it is an error; returns the calls."""
        for call in calls:
            try:
                call.result = self._run_one(call)
            except Llama2Error as e:
                call.result, call.error = f"error: {e}", True
            if len(call.result) > self.max_result_chars:
                call.result = call.result[:self.max_result_chars] + " ...[cut]"
        return calls

    def _run_one(self, call: ToolCall) -> str:
        tool = self.tools.get(call.name)
        call.malformed = True  # until the call is known to fit
        if tool is None:
            raise Llama2Error(f"unknown tool {call.name!r}; the tools are {', '.join(self.tools) or 'none'}")
        check_arguments(tool.spec, call.arguments)
        call.malformed = False
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = tool.fn(**call.arguments)
            except Llama2Error as e:
                box["error"] = str(e)
            except Exception as e:  # a user's tool failing is news for the model, not a crash of the request
                box["error"] = f"{type(e).__name__}: {e}"

        if tool.bounded:
            target()
        else:
            worker = threading.Thread(target=target, daemon=True, name=f"tool-{call.name}")
            worker.start()
            worker.join(self.timeout_s)
            if worker.is_alive():  # left to finish on its own (a thread cannot be killed); its result is dropped
                raise Llama2Error(f"{call.name} took longer than {self.timeout_s:g} s")
        if "error" in box:
            raise Llama2Error(box["error"])
        value = box.get("value")
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def load_tools(names: str | Sequence[str], *, documents: Callable[[], Sequence[str]] | None = None,
               timeout_s: float = TIMEOUT_S) -> Toolbox:
    """A Toolbox from names: `calculator`, `search` (over `documents()`), or `module:function` (a Python
    function importable from the current directory or the environment)."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    box = Toolbox(timeout_s=timeout_s)
    for name in items:
        if name == "calculator":
            box.register(calculator_tool())
        elif name == "search":
            if documents is None:
                raise Llama2Error("the search tool needs documents to search; give a corpus")
            box.register(search_tool(documents()))
        elif ":" in name:
            module, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise Llama2Error(f"cannot load tool {name!r}: {e}") from None
            if not callable(fn):
                raise Llama2Error(f"tool {name!r} is not a function")
            box.register(fn)
        else:
            raise Llama2Error(f"unknown tool {name!r}; use calculator, search or module:function")
    return box


def as_specs(tools: Sequence[Any]) -> list[ToolSpec]:
    specs = [as_spec(t) for t in tools]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise Llama2Error(f"tool names must be unique, got {names}")
    return specs
