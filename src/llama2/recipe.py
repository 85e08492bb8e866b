"""Recipes: typed YAML plus dotted `key=value` overrides, validated into dataclasses.

`load_recipe(PretrainRecipe, "configs/tiny/pretrain.yaml", ["optim.lr=1e-3", "max_steps=50"])` returns a validated
instance; a wrong key or value raises Llama2Error naming the key and what is allowed. `check(ok, key, value,
allowed)` is the one way a recipe's own `validate()` reports a bad value.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import Llama2Error

T = TypeVar("T")




def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise Llama2Error(f"recipe key {key!r}: got {value!r}; allowed: {allowed}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check/convert one value against a type annotation; raise Llama2Error naming the key on mismatch."""
    origin = typing.get_origin(tp)
    bad = Llama2Error(f"recipe key {key!r}: got {value!r}; allowed: {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and dataclasses.is_dataclass(members[0]) and isinstance(value, dict):
            return _convert(members[0], value, key)  # a section | None: the error names the bad key inside it
        for a in members:
            try:
                return _convert(a, value, key)
            except Llama2Error:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Any:
        return value
    raise TypeError(f"unsupported recipe field type {tp!r} at {key}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, checking every key and value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = f"under {prefix!r}" if prefix else "at the top level"
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise Llama2Error(f"unknown recipe key {key!r}; allowed keys {where}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        factory = fields[name].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING:
            default = factory()
            if dataclasses.is_dataclass(default):  # a partial section keeps the stage's own defaults for the rest
                value = _merged(to_dict(default), value)
        kwargs[name] = _convert(hints[name], value, key)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise Llama2Error(f"recipe key {key!r} is required ({_type_name(hints[missing[0]])})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None and prefix:
        validate(prefix)
    return obj


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(obj: Any) -> Any:
    """A recipe as plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=3` -> (["a", "b"], 3); values are parsed as YAML (numbers, true/false, null, [lists], {maps})."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise Llama2Error(f"override {item!r} is not key=value (e.g. optim.lr=1e-3 or max_steps=100)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip().split("."), value))
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (list items by index: data.sources.0.weight=2)."""
    for path, value in parse_overrides(overrides):
        node: Any = data
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[:i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise Llama2Error(f"override {'.'.join(path)}: {where!r} is not an index of a list of "
                                      f"{len(node)} item(s)")
                node = node[int(part)]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise Llama2Error(f"override {'.'.join(path)}: {where!r} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise Llama2Error(f"override {'.'.join(path)}: not an index of a list of {len(node)} item(s)")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_recipe(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read a YAML recipe (or start from defaults), apply `key=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise Llama2Error(f"recipe not found: {p}; pass an existing YAML file, e.g. configs/tiny/pretrain.yaml")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise Llama2Error(f"recipe {p} is not a text file (it is not UTF-8); pass a YAML recipe, e.g. "
                              "configs/tiny/pretrain.yaml") from None
        except yaml.YAMLError as e:
            raise Llama2Error(f"recipe {p} is not valid YAML: {e}") from None
        if loaded is None:
            raise Llama2Error(f"recipe {p} is empty; write the keys to set in it (`llama2 STAGE --keys` lists them), "
                              "e.g. starting from configs/tiny/STAGE.yaml")
        if not isinstance(loaded, dict):
            raise Llama2Error(f"recipe {p} must be a YAML mapping of keys to values")
        data = loaded
    data = apply_overrides(data, overrides or [])
    recipe = from_dict(cls, data)
    recipe.validate()  # type: ignore[attr-defined]
    return recipe


def _field_comments(cls: type) -> dict[str, str]:
    """The comment of each field in the class's source, after it on its line or in the lines just above (the
    recipe's documentation of that key)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for i, line in enumerate(lines):
            m = re.match(r"^    (\w+): [^#]*?(?:#\s*(.+))?$", line)
            if not m:
                continue
            above = []
            for prev in reversed(lines[:i]):
                if not prev.startswith("    # "):
                    break
                above.insert(0, prev[6:].strip())
            text = m.group(2) if m.group(2) and not m.group(2).startswith(("type:", "noqa")) else " ".join(above)
            if text:
                comments[m.group(1)] = text
    return comments


def recipe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every key of a recipe class, sections flattened: (dotted key, allowed values, default, comment)."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if dataclasses.is_dataclass(hints[f.name]) and dataclasses.is_dataclass(default):
            rows.extend(recipe_keys(hints[f.name], f"{key}."))
            continue
        shown = "(required)" if default is dataclasses.MISSING else yaml.safe_dump(
            to_dict(default), default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
        rows.append((key, _type_name(hints[f.name]), shown, comments.get(f.name, "")))
        members = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        if default is None and len(members) == 1 and dataclasses.is_dataclass(members[0]):
            rows.extend(recipe_keys(members[0], f"{key}."))  # an optional section: its keys once it is given
    return rows


def keys_table(cls: type) -> str:
    """recipe_keys as a Markdown table (`llama2 <stage> --keys`)."""
    out = ["| key | allowed | default | meaning |", "|---|---|---|---|"]
    for key, allowed, default, comment in recipe_keys(cls):
        cells = [f"`{key}`", allowed, f"`{default}`" if default else "`''`", comment]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)
