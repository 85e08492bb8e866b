"""Prompt sets for the RLHF stages (rejection sampling, PPO): the prompts a policy answers, each with the paper's
IS_SAFETY tag.

**Files.** JSON lines, one prompt per line:

    {"messages": [{"role": "system", ...}, {"role": "user", "content": "..."}], "safety": true}
    {"prompt": "What does os.getcwd() do?"}                       # text: one user message
    [{"role": "user", "content": "..."}]                          # a bare list of messages

The messages end with the user message to answer (earlier turns allowed, checked as `llama2.chat.validate_dialog`
checks a prompt); `safety` (optional, default false) tags a safety prompt: its combined reward is the safety RM's.
A bad line is reported as `file:line: reason`.

**Built-in prompts** (`builtin_prompts`): the prompts of the built-in dialogues (each dialogue up to its last user
turn; the synthetic safety dialogues tagged safety) and the synthetic safety requests of the built-in comparisons
(harmful requests and benign look-alikes, all tagged safety). Training prompts come from the training files,
held-out ones from the held-out files, so held-out rewards are measured on prompts never trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..chat import validate_dialog
from ..errors import Llama2Error
from ..recipe import check
from .comparisons import ensure_comparisons, read_comparisons
from .dialogues import ensure_dialogues, read_dialogues, stable_hash
from .jsonl import OnBadLine, read_jsonl, write_jsonl
from .world import data_path

HINT = ('each line must be a prompt: {"messages": [... ending with a user message], "safety": true|false}, '
        '{"prompt": "text"}, or a bare list of messages')


@dataclass
class PromptItem:
    """A prompt to answer: chat messages ending with a user message, and whether it is a safety prompt."""

    messages: list[dict[str, str]]
    safety: bool = False

    @property
    def text(self) -> str:
        """The last user message (for reports)."""
        return self.messages[-1]["content"]

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "safety": self.safety}


def check_prompt(messages: Any, safety: Any = False) -> PromptItem:
    """A PromptItem from in-memory messages (or text), checked; Llama2Error if invalid."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if problem := prompt_problem(messages, safety):
        raise Llama2Error(problem)
    return PromptItem([{"role": m["role"], "content": m["content"]} for m in messages], bool(safety))


def prompt_problem(messages: Any, safety: Any) -> str | None:
    if not isinstance(safety, bool):
        return f'"safety" must be true or false, got {safety!r}'
    try:
        validate_dialog(messages, complete=False)
    except Llama2Error as e:
        return str(e)
    if not messages[-1]["content"].strip():
        return "the user message to answer is empty"
    return None


def read_prompts(path: Path | str, *, on_bad_line: OnBadLine = "error") -> list[PromptItem]:
    """Every prompt of a JSONL file (module docstring). A bad line raises BadLine (`file:line: reason`), or with
    on_bad_line="skip" is counted, and a line saying how many and why is printed."""
    reader = read_jsonl(path, on_bad_line=on_bad_line, hint=HINT if on_bad_line == "error" else "", arrays=True)
    out: list[PromptItem] = []
    for lineno, obj in reader:
        if isinstance(obj, list):
            messages, safety = obj, False
        elif "messages" in obj:
            messages, safety = obj["messages"], obj.get("safety", False)
        elif "prompt" in obj:
            prompt = obj["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            safety = obj.get("safety", False)
        else:
            reader.bad(lineno, 'no "messages" (or "prompt") field')
            continue
        if problem := prompt_problem(messages, safety):
            reader.bad(lineno, problem)
            continue
        out.append(PromptItem([{"role": m["role"], "content": m["content"]} for m in messages], safety))
    return reader.finish(out, "prompts", HINT)


def write_prompts(path: Path | str, prompts: Iterable[PromptItem]) -> Path:
    return write_jsonl(path, (p.to_json() for p in prompts))


def builtin_prompts(quiet: bool = False) -> tuple[list[PromptItem], list[PromptItem]]:
    """(training prompts, held-out prompts) of the built-in data (module docstring), built into the cache when
    missing; each list in a fixed seeded order that mixes the sources."""
    out = []
    for dialogue_path, comparison_path in zip(ensure_dialogues(quiet=quiet), ensure_comparisons(quiet=quiet)):
        items: dict[str, PromptItem] = {}
        for d in read_dialogues(dialogue_path).dialogues:
            p = PromptItem(d.messages[:-1], d.source == "safety")
            items.setdefault(json.dumps(p.messages), p)
        for c in read_comparisons(comparison_path).comparisons:
            if c.safety:
                items.setdefault(json.dumps(c.prompt), PromptItem(list(c.prompt), True))
        out.append(sorted(items.values(), key=lambda p: stable_hash("prompts", json.dumps(p.messages))))
    return out[0], out[1]


def take(prompts: Sequence[PromptItem], n: int | None) -> list[PromptItem]:
    """The first n prompts (all when n is None)."""
    return list(prompts if n is None else prompts[:n])


__all__ = ["PromptItem", "check_prompt", "read_prompts", "write_prompts", "builtin_prompts", "take"]


def prompt_key(p: PromptItem) -> str:
    """A prompt's identity across runs and files (its messages as canonical JSON)."""
    return json.dumps(p.messages, sort_keys=True)


def sample_seed(seed: int, iteration: int, prompt: str, k: int) -> int:
    """A sample's seed, fixed by (run seed, iteration, prompt, sample index): independent of batching and resumes."""
    h = hashlib.sha256(f"{seed}\x1f{iteration}\x1f{prompt}\x1f{k}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


@dataclass
class PromptsSpec:
    """The prompt set (llama2.data.prompts): training prompts and held-out ones; unset: the built-in prompts."""

    path: str | None = None  # training prompts (JSONL); unset: the built-in prompts
    val_path: str | None = None  # held-out prompts (JSONL)
    on_bad_line: Literal["error", "skip"] = "error"  # error, or skip (counted and printed)
    held_out: int = 16  # held-out prompts answered greedily after each iteration

    def validate(self, prefix: str = "prompts") -> None:
        if self.val_path is not None and self.path is None:
            raise Llama2Error(f"recipe key '{prefix}.val_path' is set but '{prefix}.path' is not")
        check(self.held_out >= 1, f"{prefix}.held_out", self.held_out, "an integer >= 1")



def load_prompt_sets(spec: PromptsSpec, quiet: bool = False) -> tuple[list[PromptItem], list[PromptItem]]:
    """The training and held-out prompts a recipe's `prompts` section names (unset: the built-in prompts)."""
    if spec.path is None:
        return builtin_prompts(quiet=quiet)
    train = read_prompts(data_path(spec.path), on_bad_line=spec.on_bad_line)
    val = read_prompts(data_path(spec.val_path), on_bad_line=spec.on_bad_line) if spec.val_path else []
    return train, val
