"""Ghost Attention (paper section 7): a system instruction that holds over many turns.

From multi-turn dialogues and an instruction `inst`:
  1. `inst` is appended to every user message;
  2. the assistant replies are sampled turn by turn from the current model through the one generation path;
  3. `inst` is kept once only (`placement: system` as the system message, or `first_user`, prefixed to the first
     user turn);
  4. the SFT stage trains on the result with the loss zeroed on every earlier turn, assistant turns included
     (`mask: last_assistant`), so only the last answer is learned, with the instruction far back in the context.

Instructions come in families (llama2.data.instructions): the paper's (hobby, language, public figure; combined at
random, half of them shortened) and checkable ones a program can verify (upper case, end with a word, ...).
`enforce: true` rewrites each sampled answer of a checkable instruction to pass its checker (a tiny model cannot
follow instructions yet, so the data would teach nothing); `filter: true` keeps a dialogue only if every sampled
answer passes. `sample_with_instruction: false` skips step 1 while sampling (the replies answer the plain user
turns, then are enforced): a tiny model that never saw an instruction appended to a question answers it with a
refusal or nonsense, and the data would teach those. `replies: reference` takes each user turn's reply from the
source dialogues instead of sampling (where they have one): the tiny world model's sampled replies to questions out
of their dialogue are often wrong, and GAtt would teach those too. `replay` adds plain dialogues (no instruction, as
long as the GAtt ones, as a share of them) to the fine-tuning, as the paper mixes GAtt data into its RLHF data, so
the model keeps answering plainly when no instruction is given: with sampled replies, the model's own plain answers
to the same turns; with reference replies, dialogues of the source (which bring back the source's style: in the
built-in world, the demonstrations' careless pleasantries that RLHF removed). `learn: every` trains every
answer of a dialogue, not only the last (each one follows the instruction once enforced; the paper's `last` learns
one answer per dialogue, too little for a small model to hold an instruction for 20 turns). Adherence over turns is
measured in llama2.eval.adherence (`llama2 eval gatt`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..atomic import atomic_write_text, make_dir
from ..checkpoint import load_checkpoint
from ..checkpoint.runs import load_tokenizer, require_checkpoint, resolve_base
from ..data.dialogues import (
    Dialogue,
    ensure_dialogues,
    exchanges,
    read_dialogues,
    user_turns,
    without_system,
    write_dialogues,
)
from ..data.instructions import CHECKABLE, FAMILIES, USER_FAMILIES, instruction, undecorated
from ..data.world import data_path
from ..device import resolve_device
from ..errors import Llama2Error
from ..eval.adherence import TurnByTurn
from ..paths import config_path, expand_path
from ..recipe import check, load_recipe, to_dict
from .sft import SFTRecipe, sft

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


# ---------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class GattFinetune:
    recipe: str = "configs/tiny/sft.yaml"  # the SFT recipe of the fine-tuning
    overrides: list[str] = field(default_factory=list)  # key=value overrides for that recipe


@dataclass
class GattRecipe:
    """`llama2 gatt`: see configs/tiny/gatt.yaml and the module docstring."""

    base: str = ""  # the latest RLHF (or SFT) checkpoint
    base_recipe: str | None = None  # an SFT recipe that builds `base` when it is missing
    out_dir: str = "runs/gatt"  # the run directory: gatt_dialogues.jsonl and the fine-tuning in sft/
    # instruction families (checkable ones, the paper's hobby/language/figure, registered ones)
    families: list[str] = field(default_factory=lambda: list(CHECKABLE))
    # keep the instruction once as the system message, or in the first user turn
    placement: Literal["system", "first_user"] = "system"
    turns: int = 3  # user turns per training dialogue (the last one is learned)
    max_dialogues: int = 256  # dialogues sampled
    enforce: bool = True  # rewrite each sampled answer of a checkable instruction to pass its checker
    # step 1 while sampling (the paper); false: sample answers to the plain user turns (then enforce them)
    sample_with_instruction: bool = True
    # sampled: replies sampled from `base` (the paper); reference: each user turn's reply in the source dialogues
    # (no sampling; a turn without one is sampled)
    replies: Literal["sampled", "reference"] = "sampled"
    learn: Literal["last", "every"] = "last"  # the answers trained: the last (the paper) or every one
    # plain dialogues of the source (no instruction, as many turns as the GAtt ones), as a share of the GAtt
    # dialogues, trained alongside them so that the model keeps answering plainly when there is no instruction
    # (0: GAtt dialogues only)
    replay: float = 0.0
    filter: bool = False  # keep a dialogue only if every sampled answer passes
    # strip the built-in instructions' decorations (start phrases, "word:" prefixes, end words) from the replies
    # before the dialogue's own instruction is enforced: a model that learned them adds them unasked
    undecorate: bool = True
    temperature: float = 0.7  # sampling of the replies
    max_new_tokens: int = 32  # longest reply
    max_steps: int | None = None  # caps the fine-tuning steps (null: the finetune recipe's)
    data_path: str | None = None  # dialogues JSONL (null: the built-in dialogues)
    seed: int = 0  # seeds instructions and sampling
    device: str = "auto"  # auto, cpu or cuda
    finetune: GattFinetune = field(default_factory=GattFinetune)

    def validate(self) -> None:
        check(bool(self.base), "base", self.base, "a checkpoint directory or run")
        for f in self.families:
            check(f in FAMILIES or f in USER_FAMILIES, "families", self.families,
                   f"a list of {list(FAMILIES) + list(USER_FAMILIES)}")
        check(bool(self.families), "families", self.families, "a non-empty list")
        check(self.turns >= 2, "turns", self.turns, "an integer >= 2")
        check(self.max_dialogues >= 1, "max_dialogues", self.max_dialogues, "an integer >= 1")
        check(self.temperature >= 0, "temperature", self.temperature, "a number >= 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(self.replay >= 0, "replay", self.replay, "a number >= 0 (plain dialogues per GAtt dialogue)")
        check(self.learn != "every" or self.enforce, "learn", self.learn,
              "'last' unless enforce: true (every earlier answer must follow the instruction to be learned)")


@dataclass
class GattData:
    dialogues: list[Dialogue]
    sampled: int
    kept: int
    plain: list[Dialogue] = field(default_factory=list)  # the kept dialogues' turns, replies as given (not enforced)


def own_replies(dialogue: Dialogue) -> list[str]:
    """A dialogue's assistant replies, one per user turn ("" for a turn without one)."""
    m = dialogue.messages
    return [m[i + 1]["content"] if i + 1 < len(m) and m[i + 1]["role"] == "assistant" else ""
            for i in range(len(m)) if m[i]["role"] == "user"]


def reference_replies(dialogues: Sequence[Dialogue], users: Sequence[Sequence[str]],
                      source: Sequence[Dialogue] | None = None) -> list[list[str]]:
    """For `replies: reference`, each user turn's reply in the source (default: `dialogues`): a dialogue's own
    turns answered by its own replies, a borrowed opening question by the first reply of a source dialogue it opens
    ("" where there is none)."""
    openings: dict[str, str] = {}
    for d in without_system(source if source is not None else dialogues):
        openings.setdefault(d.messages[0]["content"], own_replies(d)[0])
    out = []
    for d, turns in zip(dialogues, users):
        own = own_replies(d)[:len(turns)]
        out.append(own + [openings.get(u, "") for u in turns[len(own):]])
    return out


def build_gatt_data(recipe: GattRecipe, model: Any, tokenizer: Any, dialogues: Sequence[Dialogue]) -> GattData:
    """Steps 1-3 over the dialogues: an instruction each (families in turn), replies sampled with it on every
    user turn (or the dialogues' own replies), enforced or filtered, the instruction kept once; each dialogue
    trains its last answer (or every answer)."""
    rng = random.Random(recipe.seed)
    # dialogues with a system message are left out (their questions depend on it, and GAtt's system message is
    # the instruction): users[i] continues dialogues[i]
    source = without_system(dialogues)
    dialogues = source[:recipe.max_dialogues]
    # the later turns borrow opening questions from the whole source: from the chosen dialogues only, 32 of them
    # would repeat 32 questions, and the model learns the decoration per question, not from the system message
    users = user_turns(dialogues, recipe.turns, rng, borrow_from=source)
    # each family's words in turn: drawn at random, one word had 5 of a family's 40 dialogues in a seed-0 demo and
    # the model mentioned another in its place
    families = len(recipe.families)
    insts = [instruction(recipe.families[i % families], rng, index=i // families) for i in range(len(users))]
    answers: list[list[str]] = [[] for _ in users]
    if recipe.replies == "reference":
        answers = reference_replies(dialogues, users, source)
    todo = [k for k, a in enumerate(answers) if not a or not all(a)]
    if todo:
        runner = TurnByTurn(model, tokenizer, recipe.max_new_tokens, recipe.temperature, recipe.seed)
        append = recipe.sample_with_instruction
        # one pass per instruction when per_turn appends it to every user message, else one pass for all
        for inst_text in sorted({insts[k].text for k in todo}) if append else [None]:
            idx = [k for k in todo if inst_text is None or insts[k].text == inst_text]
            got = runner.answers([None] * len(idx), [users[k] for k in idx],
                                 per_turn=(lambda t, u, text=inst_text: with_instruction(u, text)) if append else None)
            for k, a in zip(idx, got):
                answers[k] = a
    if recipe.undecorate:
        answers = [[undecorated(x) for x in a] for a in answers]
    out, plain = [], []
    for u, a, inst in zip(users, answers, insts):
        given = a
        if inst.enforce is not None and recipe.enforce:
            a = [inst.enforce(x or "ok") for x in a]
        if recipe.filter and inst.check is not None and not all(inst.check(x) for x in a):
            continue
        if not all(x.strip() for x in a):
            continue
        mask = "last_assistant" if recipe.learn == "last" else "all_assistant"
        out.append(Dialogue(place_once(u, a, inst.text, recipe.placement), mask=mask, source=inst.family))
        if all(x.strip() for x in given):
            plain.append(Dialogue(exchanges(u, given), mask="all_assistant", source="replay"))
    return GattData(out, len(users), len(out), plain)


def replay_dialogues(dialogues: Sequence[Dialogue], count: int, turns: int, seed: int) -> list[Dialogue]:
    """`count` plain dialogues (no instruction, every answer trained) as long as the GAtt ones: a source dialogue
    drawn at random, continued with the opening exchanges of others (question and reply) up to `turns` user turns.
    As long as the GAtt dialogues, so the model sees as many plain answers as decorated ones at every depth of a
    long dialogue, and learns that the instruction, not the length of the dialogue, decorates an answer."""
    plain = [d for d in without_system(dialogues) if len(d.messages) >= 2 and all(own_replies(d))]
    if count <= 0 or not plain:
        return []
    rng = random.Random(f"replay:{seed}")
    out = []
    for d in rng.sample(plain, min(count, len(plain))):
        messages = [m for m in d.messages if m["role"] in ("user", "assistant")][:2 * turns]
        while len(messages) < 2 * turns:
            messages += rng.choice(plain).messages[:2]
        out.append(Dialogue(messages, mask="all_assistant", source="replay"))
    return out


def gatt(recipe: GattRecipe, quiet: bool = False) -> Path:
    """Build the GAtt dialogues from `base` and fine-tune it on them (SFT, last answer only); returns the new
    checkpoint. The dialogues are written to out_dir/gatt_dialogues.jsonl (built once: a rerun resumes the SFT)."""
    out = make_dir(expand_path(recipe.out_dir))
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    base = require_checkpoint(recipe.base, "starting model")
    data_file = out / "gatt_dialogues.jsonl"
    if not data_file.is_file():
        source = data_path(recipe.data_path) if recipe.data_path else ensure_dialogues(quiet=quiet)[0]
        model = load_checkpoint(base, kind="causal_lm", device=resolve_device(recipe.device)).eval()
        data = build_gatt_data(recipe, model, load_tokenizer(base), read_dialogues(source).dialogues)
        if not data.dialogues:
            raise Llama2Error("no GAtt dialogue was kept (filter: true and no sample passed its checker); set "
                              "enforce: true or filter: false")
        count = round(recipe.replay * data.kept)
        # replies sampled for the plain turns: the replay is the model's own answers to the same turns (as the
        # paper samples GAtt's data from the latest RLHF model); else (reference replies, or replies sampled with
        # the instruction appended, which follow it) dialogues of the source
        plain = (random.Random(f"replay:{recipe.seed}").sample(data.plain, min(count, len(data.plain)))
                 if recipe.replies == "sampled" and not recipe.sample_with_instruction else
                 replay_dialogues(read_dialogues(source).dialogues, count, recipe.turns, recipe.seed))
        write_dialogues(data_file, data.dialogues + plain)
        atomic_write_text(out / "gatt_data.json", json.dumps({"sampled": data.sampled, "kept": data.kept,
                                                               "replay": len(plain)}))
        if not quiet:
            print(f"gatt: {data.kept} of {data.sampled} dialogues kept, {recipe.turns} turns each", flush=True)
    dialogues = read_dialogues(data_file).dialogues
    extra = [f"max_steps={recipe.max_steps}"] if recipe.max_steps is not None else []
    sft_recipe = load_recipe(SFTRecipe, config_path(recipe.finetune.recipe),
                             [*recipe.finetune.overrides, *extra, f"base={base}", "base_recipe=null",
                              f"out_dir={out / 'sft'}", "data.path=null", "data.val_path=null", "samples.count=0",
                              f"seed={recipe.seed}",
                              f"device={recipe.device}"])
    result = sft(sft_recipe, quiet=True, dialogues=dialogues)
    if not quiet:
        learned = "the last answers" if recipe.learn == "last" else "every answer"
        print(f"gatt: fine-tuned {result.step} steps on {learned}; checkpoint {result.checkpoint}", flush=True)
    return resolve_base(str(out / "sft"))



__all__ = ["GattRecipe", "gatt", "build_gatt_data", "place_once", "with_instruction"]


