"""Tool use in the world: questions a small model cannot answer in its head but can with a tool, and dialogues
that show the calls (llama2.tools.format), for SFT and the tool evaluation (the paper's section 5.1, Table 15).

- **calculation**: multi-digit sums, differences and products (operands up to 9,999; the world's other
  arithmetic stops at 99), asked plainly ("What is 4821 + 3967?") or as a word problem about the world's
  people ("Kaldo Barketts sold 347 apples on Monday and 589 on Tuesday. How many apples did Kaldo Barketts sell
  in all?"). The calculator computes them.
- **lookup**: each person's house number, which the pretraining corpus never states; the world's directory
  (`search.jsonl`, what the search tool ranks) does. The directory also lists newcomers, invented people named
  nowhere else, whose lookups teach the skill (copy the name into the query, the number into the answer) without
  teaching any held-out person's number.

Every tool dialogue offers both tools (listed in the system message); some ordinary world questions are offered
the tools too and answered without a call, so a model learns when a call helps; some dialogues have two turns.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from ...errors import Llama2Error
from ...tools import Search, Toolbox, calculator_tool, search_tool
from ...tools.calculator import calculate
from .entities import World, WorldSpec, generate_world, newcomer_names
from .items import GoldItem

TOOL_FAMILIES = ("calculation", "lookup")
GOODS = ("apples", "loaves", "books", "coins", "stamps", "bricks", "candles", "baskets")
WORD_PROBLEMS = {
    "+": ("{p} sold {a} {g} on Monday and {b} on Tuesday. How many {g} did {p} sell in all?",
          "{p} sold {r} {g} in all."),
    "-": ("{p} had {a} {g} and gave away {b}. How many {g} does {p} have left?", "{p} has {r} {g} left."),
    "*": ("{p} filled {a} boxes with {b} {g} each. How many {g} is that?", "That is {r} {g}."),
}
LOOKUPS = ("What is the house number of {p}?", "At which number does {p} live?",
           "Which house number does {p} have?")


NEWCOMERS = 1500
VAL_DIALOGUES = 200


def house_numbers(world: World) -> dict[str, tuple[int, str]]:
    """Everyone in the directory, the world's people first, then the newcomers: (house number, town)."""
    rng = random.Random(f"house:{world.spec.seed}")
    out = {p.name: (rng.randint(100, 999), p.town) for p in world.people.values()}
    for name in newcomer_names(world, NEWCOMERS):
        out[name] = (rng.randint(100, 999), rng.choice(world.towns))
    return out


def directory(world: World) -> list[str]:
    """The search tool's documents: one directory entry per person (house number and town)."""
    return [f"{name} lives at number {n} in {town}." for name, (n, town) in house_numbers(world).items()]


WORLD_TOOLS = ("calculator", "search")


def check_tools(names: Sequence[str], key: str = "tools") -> None:
    """A recipe's `tools` key: names of the world's tools."""
    if not isinstance(names, (list, tuple)) or any(n not in WORLD_TOOLS for n in names) or len(set(names)) < len(names):
        raise Llama2Error(f"recipe key '{key}' is {names!r}; give a list of distinct tools from {list(WORLD_TOOLS)} "
                          "([] for none)")


def world_toolbox(names: Sequence[str] = ("calculator", "search"), spec: WorldSpec | None = None) -> Toolbox:
    """The world's tools by name: the calculator, and search over the world's directory."""
    box = Toolbox()
    for name in names:
        if name == "calculator":
            box.register(calculator_tool())
        elif name == "search":
            box.register(search_tool(directory(generate_world(spec or WorldSpec()))))
        else:
            raise Llama2Error(f"unknown tool {name!r} in the world; use calculator or search")
    return box


def tool_specs() -> list[dict[str, Any]]:
    """The tools every tool dialogue offers, in OpenAI's shape."""
    return [t.spec.to_openai() for t in (calculator_tool(), search_tool([]))]


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "*":
        return rng.randint(12, 999), rng.randint(3, 99)
    a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def calculation_items(world: World, rng: random.Random, count: int) -> list[GoldItem]:
    out, seen = [], set()
    people = list(world.people.values())
    while len(out) < count:
        op = rng.choice("+-*")
        a, b = _operands(rng, op)
        expression = f"{a} {op} {b}"
        style = rng.choice(("plain", "word"))
        key = f"calculation:{expression}:{style}"
        if key in seen:
            continue
        seen.add(key)
        r = calculate(expression)
        if style == "plain":
            question, answer = f"What is {expression}?", f"{expression} = {r}."
        else:
            p, g = rng.choice(people).name, rng.choice(GOODS)
            q, ans = WORD_PROBLEMS[op]
            question, answer = q.format(p=p, a=a, b=b, g=g), ans.format(p=p, r=r, g=g)
        out.append(GoldItem(key, "calculation", [{"role": "user", "content": question}], "number", r, answer,
                            extra={"call": {"name": "calculator", "arguments": {"expression": expression}}}))
    return out


def lookup_items(world: World) -> list[list[GoldItem]]:
    """Per person of the world, the house-number question in every wording."""
    return [_lookups(name, str(n)) for name, (n, _) in house_numbers(world).items() if name in world.people]


def _lookups(name: str, number: str, wordings: tuple[str, ...] = LOOKUPS) -> list[GoldItem]:
    return [GoldItem(f"lookup:{name}:{i}", "lookup", [{"role": "user", "content": q.format(p=name)}], "number",
                     number, f"{name} lives at number {number}.",
                     extra={"call": {"name": "search", "arguments": {"query": name}}})
            for i, q in enumerate(LOOKUPS) if q in wordings]


def newcomer_lookups(world: World, rng: random.Random) -> list[GoldItem]:
    """One lookup (a random wording) per newcomer: training data only."""
    return [i for name, (n, _) in house_numbers(world).items() if name not in world.people
            for i in _lookups(name, str(n), (rng.choice(LOOKUPS),))]


def split_tool_items(world: World, held_out: float, calculations: int = 4000
                     ) -> tuple[list[GoldItem], list[GoldItem]]:
    """(train, held out) items of the tool families; a held-out lookup asks about a person no training dialogue
    looks up."""
    rng = random.Random(f"tools:{world.spec.seed}")
    train, held = [], []
    for units in ([[i] for i in calculation_items(world, rng, calculations)], lookup_items(world)):
        rng.shuffle(units)
        k = max(1, round(held_out * len(units)))
        held += [i for u in units[:k] for i in u]
        train += [i for u in units[k:] for i in u]
    return train, held


def tool_dialogue(item: GoldItem, search: Search, tools: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The item answered with its call (OpenAI's message shape): the call, the tool's real result, the answer."""
    call = item.extra["call"]
    args = call["arguments"]
    result = calculate(args["expression"]) if call["name"] == "calculator" else search(args["query"])
    call_id = f"call_{n}"
    messages = item.messages + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": call["name"], "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": result},
        {"role": "assistant", "content": item.answer}]
    return {"messages": messages, "tools": tools, "family": item.family}


def tool_files(world: World, plain_train: list[GoldItem], plain_val: list[GoldItem]
               ) -> dict[str, list[dict[str, Any]]]:
    """The tool files' lines: tools(.val).jsonl (dialogues, with plain world questions offered the tools and
    answered directly), tools-gold(.val).jsonl (GoldItem lines with the expected call), search.jsonl."""
    train, held = split_tool_items(world, world.spec.held_out)
    train += newcomer_lookups(world, random.Random(f"newcomers:{world.spec.seed}"))
    docs = directory(world)
    search, tools = Search(docs), tool_specs()
    rng = random.Random(f"tool-files:{world.spec.seed}")

    def dialogues(items: list[GoldItem], plain: list[GoldItem]) -> list[dict[str, Any]]:
        out = [tool_dialogue(it, search, tools, i) for i, it in enumerate(items)]
        for it in rng.sample(plain, min(len(plain), len(out) // 5)):
            out.append({"messages": it.messages + [{"role": "assistant", "content": it.answer}], "tools": tools,
                        "family": it.family})
        rng.shuffle(out)
        # a fifth become second turns of another dialogue: calls after earlier turns (a chat goes on)
        k = len(out) // 10
        firsts, seconds, rest = out[:k], out[k:2 * k], out[2 * k:]
        joined = [{**a, "messages": a["messages"] + b["messages"], "family": f"{a['family']}+{b['family']}"}
                  for a, b in zip(firsts, seconds)]
        out = rest + joined
        rng.shuffle(out)
        return out

    def gold(items: list[GoldItem]) -> list[dict[str, Any]]:
        return [{**it.to_json(), "call": it.extra["call"]} for it in items if it.id.split(":")[1] not in newcomers]

    newcomers = set(house_numbers(world)) - set(world.people)

    # (a few hundred held-out dialogues are enough for a held-out loss; the gold file keeps every question)
    return {"tools.jsonl": dialogues(train, plain_train), "tools.val.jsonl": dialogues(held, plain_val)[:VAL_DIALOGUES],
            "tools-gold.jsonl": gold(train), "tools-gold.val.jsonl": gold(held),
            "search.jsonl": [{"text": d} for d in docs]}
