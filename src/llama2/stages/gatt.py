"""Ghost Attention (paper section 7): a system instruction that holds over many turns.

From multi-turn dialogues and an instruction `inst`:
  1. `inst` is appended to every user message;
  2. the assistant replies are sampled turn by turn from the current model through the one generation path;
  3. `inst` is kept once only (`placement: system` as the system message, or `first_user`, prefixed to the first
     user turn);
  4. the SFT stage trains on the result with the loss zeroed on every earlier turn, assistant turns included
     (`mask: last_assistant`), so only the last answer is learned, with the instruction far back in the context.

Instructions come in families. The paper's (hobby "You enjoy ...", language "Speak in ...", public figure "Act as
..."; combined at random, half of them shortened) have no checker. The checkable ones a program can verify:
upper case, end every answer with a word, at most N words, always mention a word, start with a phrase.
`enforce: true` rewrites each sampled answer of a checkable instruction to pass its checker (a tiny model cannot
follow instructions yet, so the data would teach nothing); `filter: true` keeps a dialogue only if every sampled
answer passes. Adherence is measured by `adherence(...)` (`llama2 eval gatt`): the instruction as the system
message, later user turns from held-out dialogues, greedy answers, the share that pass the checker at each turn.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..atomic import atomic_write_text, make_dir
from ..data.dialogues import Dialogue, read_dialogues
from ..errors import Llama2Error
from ..train.config import _check, expand_path, load_recipe, to_dict
from .sft import _config_path, ensure_model

# ---------------------------------------------------------------------------------------------------------------
# Instructions and their checkers


@dataclass
class Instruction:
    """One instruction: its family, its text (and a shortened form), and, for checkable families, a checker
    (answer -> passes) and an enforcer (answer -> an answer that passes)."""

    family: str
    text: str
    short: str
    check: Callable[[str], bool] | None = None
    enforce: Callable[[str], str] | None = None


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def upper_case() -> Instruction:
    def check(a: str) -> bool:
        letters = [c for c in a if c.isalpha()]
        return bool(letters) and all(c.isupper() for c in letters)

    return Instruction("upper_case", "Answer in capital letters only.", "Use capital letters.", check,
                       lambda a: a.upper())


def end_with(word: str) -> Instruction:
    def check(a: str) -> bool:
        w = _words(a)
        return bool(w) and w[-1].lower() == word.lower()

    return Instruction("end_with", f"End every answer with the word '{word}'.", f"End with '{word}'.", check,
                       lambda a: a.rstrip() + f" {word}")


def at_most(n: int) -> Instruction:
    return Instruction("at_most_words", f"Answer in at most {n} words.", f"At most {n} words.",
                       lambda a: 0 < len(a.split()) <= n, lambda a: " ".join(a.split()[:n]))


def mention(word: str) -> Instruction:
    return Instruction("mention", f"Always mention the word '{word}'.", f"Mention '{word}'.",
                       lambda a: word.lower() in (w.lower() for w in _words(a)), lambda a: f"{word}: {a}")


def start_with(phrase: str) -> Instruction:
    return Instruction("start_with", f"Start every answer with '{phrase}'.", f"Start with '{phrase}'.",
                       lambda a: a.strip().lower().startswith(phrase.lower()), lambda a: f"{phrase} {a}")


HOBBIES = ("tennis", "chess", "gardening", "painting", "hiking")
LANGUAGES = ("French", "Spanish", "Italian", "German")
FIGURES = ("Napoleon", "Ada Lovelace", "Alan Turing", "Marie Curie")
WORDS = ("indeed", "python", "friend", "certainly")
PHRASES = ("Well,", "In short,", "Dear user,")
CHECKABLE = ("upper_case", "end_with", "at_most_words", "mention", "start_with")
PAPER_FAMILIES = ("hobby", "language", "figure")
FAMILIES = CHECKABLE + PAPER_FAMILIES


USER_FAMILIES: dict[str, Callable[[random.Random], Instruction]] = {}


def register_family(name: str, make: Callable[[random.Random], Instruction]) -> None:
    """Add an instruction family: make(rng) returns an Instruction (with check and enforce for a checkable one).
    Registered families may be named in a recipe's `families` and are measured by adherence()."""
    if name in FAMILIES:
        raise Llama2Error(f"instruction family {name!r} exists already; choose another name")
    USER_FAMILIES[name] = make


def instruction(family: str, rng: random.Random) -> Instruction:
    """A random instruction of a family (for the paper's families, half of them combined with another and half
    shortened, as the paper does)."""
    if family in USER_FAMILIES:
        return USER_FAMILIES[family](rng)
    if family == "upper_case":
        return upper_case()
    if family == "end_with":
        return end_with(rng.choice(WORDS))
    if family == "at_most_words":
        return at_most(rng.choice((5, 8, 12)))
    if family == "mention":
        return mention(rng.choice(WORDS))
    if family == "start_with":
        return start_with(rng.choice(PHRASES))
    if family not in PAPER_FAMILIES:
        raise Llama2Error(f"unknown instruction family {family!r}; use some of {list(FAMILIES)}")
    parts = {"hobby": (f"You enjoy {rng.choice(HOBBIES)}.", "hobby"), "language": (f"Speak in {rng.choice(LANGUAGES)}.",
                                                                                   "language"),
             "figure": (f"Act as {rng.choice(FIGURES)}.", "figure")}
    chosen = [family] + ([rng.choice([f for f in PAPER_FAMILIES if f != family])] if rng.random() < 0.5 else [])
    text = " ".join(parts[f][0] for f in chosen)
    short = " ".join(parts[f][0].split(" ", 1)[1] for f in chosen) if rng.random() < 0.5 else text
    return Instruction(family, text, short)


# ---------------------------------------------------------------------------------------------------------------
# The data transformation


def with_instruction(user: str, inst: str) -> str:
    """Step 1: the instruction appended to a user message."""
    return f"{user} {inst}"


def place_once(users: Sequence[str], answers: Sequence[str], inst: str, placement: str,
               system: str | None = None) -> list[dict[str, str]]:
    """Step 3: the dialogue with the instruction kept once, as the system message (joined to an existing one) or
    at the start of the first user turn."""
    if placement not in ("system", "first_user"):
        raise Llama2Error(f"placement must be 'system' or 'first_user', got {placement!r}")
    out: list[dict[str, str]] = []
    if placement == "system":
        out.append({"role": "system", "content": f"{system} {inst}" if system else inst})
    elif system:
        out.append({"role": "system", "content": system})
    for i, (u, a) in enumerate(zip(users, answers)):
        content = f"{inst} {u}" if placement == "first_user" and i == 0 else u
        out += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    return out


def user_turns(dialogues: Sequence[Dialogue], turns: int, rng: random.Random) -> list[list[str]]:
    """Lists of `turns` user messages: the user turns of one dialogue, continued with those of others (the
    built-in dialogues have 1-3 turns), so every list is as long as asked."""
    pool = [m["content"] for d in dialogues for m in d.messages if m["role"] == "user"]
    if not pool:
        raise Llama2Error("no user messages in the dialogues")
    out = []
    for d in dialogues:
        mine = [m["content"] for m in d.messages if m["role"] == "user"]
        while len(mine) < turns:
            mine.append(rng.choice(pool))
        out.append(mine[:turns])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generating turn by turn, adherence


class TurnByTurn:
    """Greedy or sampled answers, one turn at a time, for many dialogues at once (the one generation path);
    the context is trimmed as `llama2 chat` does (the oldest exchanges dropped, the system message kept)."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> None:
        from ..inference.generate import Generator

        self.model, self.tok = model, tokenizer
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.gen = Generator(model, tokenizer, max_batch_size=16)

    def answers(self, systems: Sequence[str | None], users: Sequence[Sequence[str]],
                per_turn: Callable[[int, str], str] | None = None) -> list[list[str]]:
        """Answers to every dialogue's user turns (per_turn(i, user) rewrites the user message of turn i)."""
        from ..chat_session import ChatSession
        from ..inference.generate import SamplingParams

        sessions = [ChatSession(self.tok, self.model.config.max_seq_len, self.max_new_tokens, system=s)
                    for s in systems]
        out: list[list[str]] = [[] for _ in users]
        for t in range(max(len(u) for u in users)):
            live = [i for i, u in enumerate(users) if t < len(u)]
            prompts, params = [], []
            for i in live:
                text = per_turn(t, users[i][t]) if per_turn else users[i][t]
                prompts.append(sessions[i].prepare(text).tokens)
                params.append(SamplingParams(temperature=self.temperature, top_p=1.0,
                                             max_new_tokens=self.max_new_tokens, seed=self.seed + 7919 * i + t))
            with torch.no_grad():
                done = self.gen.generate(prompts, params)
            for i, c in zip(live, done):
                answer = c.text.strip()
                text = per_turn(t, users[i][t]) if per_turn else users[i][t]
                sessions[i].add_turn(text, answer or "...")
                out[i].append(answer)
        return out


def adherence(model: Any, tokenizer: Any, instructions: Sequence[Instruction], users: Sequence[Sequence[str]],
              max_new_tokens: int = 32) -> dict[str, list[float]]:
    """Per checkable family, the share of dialogues whose greedy answer at turn t passes the checker (t = 1..the
    dialogues' length), with the instruction as the system message."""
    fams: dict[str, list[list[bool]]] = {}
    runner = TurnByTurn(model, tokenizer, max_new_tokens)
    for inst in instructions:
        if inst.check is None:
            continue
        answers = runner.answers([inst.text] * len(users), users)
        fams.setdefault(inst.family, []).extend([[inst.check(a) for a in row] for row in answers])
    return {f: [sum(r[t] for r in rows) / len(rows) for t in range(len(rows[0]))] for f, rows in fams.items()}


# ---------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class GattFinetune:
    recipe: str = "configs/tiny/sft.yaml"
    overrides: list[str] = field(default_factory=list)


@dataclass
class GattRecipe:
    """`llama2 gatt`: see configs/tiny/gatt.yaml and the module docstring."""

    base: str = ""  # the latest RLHF (or SFT) checkpoint
    base_recipe: str | None = None  # an SFT recipe that builds `base` when it is missing
    out_dir: str = "runs/gatt"
    families: list[str] = field(default_factory=lambda: list(CHECKABLE))
    placement: Literal["system", "first_user"] = "system"
    turns: int = 3  # user turns per training dialogue (the last one is learned)
    max_dialogues: int = 256
    enforce: bool = True
    filter: bool = False
    temperature: float = 0.7
    max_new_tokens: int = 32
    max_steps: int | None = None  # caps the fine-tuning steps (null: the finetune recipe's)
    data_path: str | None = None  # dialogues JSONL (null: the built-in dialogues)
    seed: int = 0
    device: str = "auto"
    finetune: GattFinetune = field(default_factory=GattFinetune)

    def validate(self) -> None:
        _check(bool(self.base), "base", self.base, "a checkpoint directory or run")
        for f in self.families:
            _check(f in FAMILIES or f in USER_FAMILIES, "families", self.families,
                   f"a list of {list(FAMILIES) + list(USER_FAMILIES)}")
        _check(bool(self.families), "families", self.families, "a non-empty list")
        _check(self.turns >= 2, "turns", self.turns, "an integer >= 2")
        _check(self.max_dialogues >= 1, "max_dialogues", self.max_dialogues, "an integer >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, "a number >= 0")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")


@dataclass
class GattData:
    dialogues: list[Dialogue]
    sampled: int
    kept: int


def build_gatt_data(recipe: GattRecipe, model: Any, tokenizer: Any, dialogues: Sequence[Dialogue]) -> GattData:
    """Steps 1-3 over the dialogues: an instruction each (families in turn), replies sampled with it on every
    user turn, enforced or filtered, the instruction kept once; each dialogue trains its last answer only."""
    rng = random.Random(recipe.seed)
    dialogues = list(dialogues)[:recipe.max_dialogues]
    users = user_turns(dialogues, recipe.turns, rng)
    insts = [instruction(recipe.families[i % len(recipe.families)], rng) for i in range(len(users))]
    runner = TurnByTurn(model, tokenizer, recipe.max_new_tokens, recipe.temperature, recipe.seed)
    answers: list[list[str]] = [[] for _ in users]
    for inst_text in sorted({i.text for i in insts}):  # one pass per distinct instruction: per_turn appends it
        idx = [k for k, i in enumerate(insts) if i.text == inst_text]
        got = runner.answers([None] * len(idx), [users[k] for k in idx],
                             per_turn=lambda t, u, text=inst_text: with_instruction(u, text))
        for k, a in zip(idx, got):
            answers[k] = a
    out = []
    for u, a, inst in zip(users, answers, insts):
        if inst.enforce is not None and recipe.enforce:
            a = [inst.enforce(x or "ok") for x in a]
        if recipe.filter and inst.check is not None and not all(inst.check(x) for x in a):
            continue
        if not all(x.strip() for x in a):
            continue
        out.append(Dialogue(place_once(u, a, inst.text, recipe.placement), mask="last_assistant", source=inst.family))
    return GattData(out, len(users), len(out))


def gatt(recipe: GattRecipe, quiet: bool = False) -> Path:
    """Build the GAtt dialogues from `base` and fine-tune it on them (SFT, last answer only); returns the new
    checkpoint. The dialogues are written to out_dir/gatt_dialogues.jsonl (built once: a rerun resumes the SFT)."""
    from ..checkpoint import load_checkpoint
    from ..data.dialogues import write_dialogues
    from .rejection import _build_sft
    from .sft import SFTRecipe, load_tokenizer, resolve_base, sft

    import yaml

    out = make_dir(expand_path(recipe.out_dir))
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    base = ensure_model(recipe.base, recipe.base_recipe, "starting model", _build_sft, quiet)
    data_file = out / "gatt_dialogues.jsonl"
    if not data_file.is_file():
        from ..device import resolve_device
        from .sft import ensure_dialogues

        source = expand_path(recipe.data_path) if recipe.data_path else ensure_dialogues(quiet=quiet)[0]
        model = load_checkpoint(base, kind="causal_lm", device=resolve_device(recipe.device)).eval()
        data = build_gatt_data(recipe, model, load_tokenizer(base), read_dialogues(source).dialogues)
        if not data.dialogues:
            raise Llama2Error("no GAtt dialogue was kept (filter: true and no sample passed its checker); set "
                              "enforce: true or filter: false")
        write_dialogues(data_file, data.dialogues)
        atomic_write_text(out / "gatt_data.json", json.dumps({"sampled": data.sampled, "kept": data.kept}))
        if not quiet:
            print(f"gatt: {data.kept} of {data.sampled} dialogues kept, {recipe.turns} turns each", flush=True)
    dialogues = read_dialogues(data_file).dialogues
    extra = [f"max_steps={recipe.max_steps}"] if recipe.max_steps is not None else []
    sft_recipe = load_recipe(SFTRecipe, _config_path(recipe.finetune.recipe),
                             [*recipe.finetune.overrides, *extra, f"base={base}", "base_recipe=null",
                              f"out_dir={out / 'sft'}", "data.path=null", "samples.count=0", f"seed={recipe.seed}",
                              f"device={recipe.device}"])
    result = sft(sft_recipe, quiet=True, dialogues=dialogues)
    if not quiet:
        print(f"gatt: fine-tuned {result.step} steps on the last answers; checkpoint {result.checkpoint}", flush=True)
    return resolve_base(str(out / "sft"))


def adherence_report(ckpt: Path | str, turns: int, dialogues: int, seed: int = 0, max_new_tokens: int = 32,
                     device: str = "cpu", families: Sequence[str] | None = None) -> dict[str, Any]:
    """Adherence by turn for `ckpt` on held-out dialogues' user turns: {"turns", "families": {f: [per turn]}}."""
    from ..checkpoint import load_checkpoint
    from .sft import ensure_dialogues, load_tokenizer, resolve_base

    p = expand_path(str(ckpt))
    if (p / "gatt_dialogues.jsonl").is_file():  # a `llama2 gatt` run: its fine-tuned model
        p = p / "sft"
    path = resolve_base(str(p))
    model = load_checkpoint(path, kind="causal_lm", device=device).eval()
    rng = random.Random(seed)
    held = read_dialogues(ensure_dialogues(quiet=True)[1]).dialogues[:dialogues]
    users = user_turns(held, turns, rng)
    insts = [instruction(f, rng) for f in (families or [*CHECKABLE, *USER_FAMILIES])]
    return {"checkpoint": str(path), "turns": turns, "dialogues": len(users),
            "instruction": "the system message, kept when old exchanges are dropped to fit the context",
            "families": adherence(model, load_tokenizer(path), insts, users, max_new_tokens)}


__all__ = ["GattRecipe", "gatt", "adherence", "adherence_report", "build_gatt_data", "place_once",
           "with_instruction", "instruction", "Instruction", "CHECKABLE", "FAMILIES"]


def adherence_rows(reports: dict[str, dict[str, Any]], turns: Sequence[int] = (1, 2, 4, 6, 20)
                   ) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per (model, family), adherence % at the given turns (those the reports have), as
    the paper's Table 30 (turns 2, 4, 6, 20)."""
    n = min(r["turns"] for r in reports.values())
    cols = [t for t in turns if t <= n] or [n]
    rows = [[name, fam, *(f"{100 * per[t - 1]:.0f}%" for t in cols)]
            for name, r in reports.items() for fam, per in r["families"].items()]
    return ["model", "instruction", *(f"turn {t}" for t in cols)], rows


def adherence_table(reports: dict[str, dict[str, Any]], turns: Sequence[int] = (1, 2, 4, 6, 20)) -> str:
    """adherence_rows as a Markdown table."""
    headers, rows = adherence_rows(reports, turns)
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def adherence_plot(reports: dict[str, dict[str, Any]], path: Path) -> Path:
    """A PNG: adherence against turn, one panel per family, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_open

    fams = sorted({f for r in reports.values() for f in r["families"]})
    fig, axes = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for name, r in reports.items():
            per = r["families"].get(fam)
            if per:
                ax.plot(range(1, len(per) + 1), [100 * x for x in per], "o-", markersize=3, label=name)
        ax.set_title(fam)
        ax.set_xlabel("turn")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("adherence (%)")
    axes[0][0].legend(fontsize=8)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Where the last turn looks (the paper's Figure 10)


@torch.no_grad()
def attention_maps(model: Any, tokens: Sequence[int]) -> torch.Tensor:
    """(n_layers, T, T): each layer's attention probabilities for one sequence, averaged over heads (recomputed
    from each attention module's inputs: q and k with their rotary embeddings, causal softmax)."""
    from ..model import Attention, apply_rope

    captured: list[tuple] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, args)))
             for m in model.modules() if isinstance(m, Attention)]
    try:
        model(torch.tensor([list(tokens)], device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for mod, (x, cos, sin, *_rest) in captured:
        B, T, _ = x.shape
        q = mod.q_proj(x).view(B, T, mod.n_heads, mod.head_dim).transpose(1, 2)
        k = mod.k_proj(x).view(B, T, mod.n_kv_heads, mod.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(mod.n_heads // mod.n_kv_heads, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / mod.head_dim ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0].mean(0))
    return torch.stack(maps)


def system_attention(model: Any, tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[torch.Tensor, list[str]]:
    """For a dialogue ending with a user message (system message first): (n_layers, L) the attention mass each
    token of the last turn puts on the system message's tokens, per layer, and those L tokens' text."""
    from ..chat import B_INST, B_SYS, encode_dialog

    if not messages or messages[0]["role"] != "system":
        raise Llama2Error("system_attention needs a dialogue that starts with a system message")
    ids = encode_dialog(tokenizer, messages)
    start = 1 + len(tokenizer.encode(f"{B_INST} {B_SYS}", bos=False))  # after BOS and the system tag
    end = 1 + len(tokenizer.encode(f"{B_INST} {B_SYS}{messages[0]['content'].strip()}", bos=False))
    last = max(i for i, t in enumerate(ids) if t == tokenizer.bos_id)
    maps = attention_maps(model, ids)
    return maps[:, last:, start:end].sum(-1), [tokenizer.decode([t]) for t in ids[last:]]


def attention_figure(models: dict[str, Any], tokenizer: Any, messages: Sequence[dict[str, str]], path: Path) -> Path:
    """A PNG heatmap per model: layers x the last turn's tokens, the attention mass on the system message."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_open

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.2), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        mass, words = system_attention(model, tokenizer, messages)
        im = ax.imshow(mass.cpu().numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{name}: attention on the system message")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(words)), [w.strip() or "_" for w in words], rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
