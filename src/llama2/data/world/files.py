"""The world's data files, in the JSONL shapes every stage reads, built into the cache on first use:

    corpus.jsonl                      pretraining documents: biographies, town records, question-answer pages,
                                      worked sums and examples ({"text": ...})
    sft.jsonl, sft.val.jsonl          dialogues with their gold answers ({"messages", "family"}); the training
                                      file also holds dialogues that follow a checkable system instruction
                                      (family "instructed")
    comparisons-helpfulness(.val).jsonl   preferences of a simulated annotator ({"prompt", "chosen", "rejected",
    comparisons-safety(.val).jsonl        "rating", "safety", "gold_gap", "gold_rating"})
    prompts.jsonl, prompts.val.jsonl  prompts for rejection sampling and PPO ({"messages", "safety", "id"})
    adversarial(.val).jsonl           harmful requests and benign look-alikes for safety distillation and red-teaming
    gold.jsonl, gold.val.jsonl        every training / held-out question with its gold answer (GoldItem)
    tools(.val).jsonl                 tool-use dialogues in OpenAI's message shape ({"messages", "tools", "family"})
    tools-gold(.val).jsonl            the tool families' questions with gold answers and expected calls (tools.py)
    search.jsonl                      the documents the search tool ranks (the world's directory)

A recipe names them as `builtin:world/NAME` (e.g. `data.path: builtin:world/sft.jsonl`); `data_path` resolves
such a name (building the world when missing) and expands any other path.

**The simulated annotator.** A comparison pairs two answers of different gold score (judge.py); the annotator
perceives their gap with Gaussian noise (`annotator_noise`, its standard deviation), prefers the answer that looks
better (so a close pair is sometimes flipped) and rates the preference by the perceived gap. `gold_gap` and
`gold_rating` record the truth, so reward-model accuracy can be measured against gold per rating level.

**The demonstrations' writers.** As with human-written SFT data, not every demonstration is written with care: a
share of the plain question-answer dialogues in sft.jsonl (`careless`, default 0.8) keep the right fact and end
with a pleasantry ("I hope this helps, ..."), where that makes the answer wordy in the gold judge's eyes (the
short answers; not the worked sums). The SFT model imitates the habit (at 60% its greedy answer dropped it for most
questions, as the instructed dialogues answer concisely; at 80% it keeps it); the preferences rank the concise
answer higher, so the reward models can find it among the policy's samples and RLHF can do better than its
demonstrations (the paper's section 5, "beyond human supervision"). The held-out files keep the careful answers.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ...atomic import atomic_directory
from ...errors import Llama2Error
from ...paths import cache_dir, expand_path
from ..instructions import instruction
from ..jsonl import read_jsonl, write_jsonl
from .entities import ATTRIBUTES, FACT_PHRASINGS, MAYOR_PHRASINGS, World, WorldSpec, fact_sentence, generate_world
from .items import ANSWERS, COMPLIANCE, KIND_OF, QUESTIONS, GoldItem, split_items
from .judge import judge, mentions, rating_of
from .tools import tool_files

VERSION = 11
PREFIX = "builtin:world/"
NAMES = ("corpus.jsonl", "sft.jsonl", "sft.val.jsonl", "comparisons-helpfulness.jsonl",
         "comparisons-helpfulness.val.jsonl", "comparisons-safety.jsonl", "comparisons-safety.val.jsonl",
         "prompts.jsonl", "prompts.val.jsonl", "adversarial.jsonl", "adversarial.val.jsonl", "gold.jsonl",
         "gold.val.jsonl", "tools.jsonl", "tools.val.jsonl", "tools-gold.jsonl", "tools-gold.val.jsonl",
         "search.jsonl", "world.json")
SFT_PER_FAMILY = {"fact": 3000, "temporal": 600, "arithmetic": 1500, "list": 600, "word": 300, "multi_step": 500,
                  "follow_up": 200, "harmful": 60, "benign": 60}
BIOGRAPHIES = 6  # documents per person, each stating every attribute in a random phrasing
CORPUS_EXAMPLES = 3000  # worked examples per family in the corpus (all sums would crowd out the facts)
QA_WORDINGS = 3  # question wordings of each fact on the corpus's question-answer pages (of 5)
ANNOTATOR_NOISE = 0.1
CARELESS = 0.8  # share of the plain SFT demonstrations written carelessly (module docstring)
# SFT dialogues of one or two turns under a checkable system instruction (their answers follow it), as a chat
# model's SFT data holds instructions: the SFT model follows an instruction for a turn or two and loses it over a
# long dialogue (the paper's Figure 9), which Ghost Attention then fixes
SFT_INSTRUCTED = 600
INSTRUCTED_FAMILIES = ("upper_case", "end_with", "mention", "start_with")
FILLER = ("I hope this helps, and please let me know if you have any other questions about it.",
          "That is what I know about it, and I am always happy to tell you more whenever you like.")


def world_dir(spec: WorldSpec) -> Path:
    return cache_dir() / f"world-v{VERSION}-seed{spec.seed}-p{spec.people}-t{spec.towns}"


# ---------------------------------------------------------------------------------------------------------------
# The pretraining corpus


def corpus_documents(world: World, train: dict[str, list[GoldItem]]) -> list[str]:
    """Every fact in several phrasings, question-answer pages (three of the five wordings of every fact, held-out
    ones included: knowledge is pretrained, the chat format is not), the mayors by year, and worked sums,
    differences and examples from the training questions only (the held-out ones must be computed)."""
    rng = random.Random(f"corpus:{world.spec.seed}")
    docs = []
    for person in world.people.values():
        for _ in range(BIOGRAPHIES):
            attrs = list(ATTRIBUTES)
            rng.shuffle(attrs)
            docs.append(" ".join(fact_sentence(world, rng, person, a) for a in attrs))
        page = []
        for attr in ATTRIBUTES:
            for q in rng.sample(QUESTIONS[attr], QA_WORDINGS):
                fact = rng.choice(FACT_PHRASINGS[attr]).format(p=person.name, v=person.value(attr))
                page.append(f"Question: {q.format(p=person.name)}\nAnswer: {fact}")
        rng.shuffle(page)
        docs.append("\n".join(page))
    for town in world.towns:
        for _ in range(3):
            docs.append(" ".join(rng.choice(MAYOR_PHRASINGS).format(y=y, t=town, p=world.mayors[town][y])
                                 for y in world.years))
    for family in ("arithmetic", "list", "word", "multi_step"):
        items = list(train[family])
        rng.shuffle(items)
        items = items[:CORPUS_EXAMPLES]
        for i in range(0, len(items), 12):
            docs.append("\n".join(f"Question: {it.question}\nAnswer: {it.answer}" if family != "arithmetic"
                                  else it.answer for it in items[i:i + 12]))
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------------------------------------------------------
# Comparisons from the gold judge and a noisy annotator


def _replace_last(text: str, old: str, new: str) -> str:
    i = text.rfind(old)
    return text if i < 0 else text[:i] + new + text[i + len(old):]


def _wrong_value(world: World, item: GoldItem, rng: random.Random) -> str:
    if item.kind == "number":
        g = int(item.gold)
        return str(max(0, g + rng.choice((-10, -2, -1, 1, 2, 10))))
    if item.kind == "letter":
        return rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != item.gold])
    return rng.choice([v for v in world.vocabulary(item.kind) if v != item.gold])


def _off_topic(world: World, item: GoldItem, rng: random.Random) -> str:
    """A tidy answer to another question: a fact of another kind about the person the question names (else about
    someone else), as a model that recalls the wrong fact says it ("What pet does X have?" -> "X lives in Y.")."""
    named = mentions(world, "person", " ".join(m["content"] for m in item.messages))
    others = [n for n in world.people if n != item.gold]
    person = world.people[named[0] if named else rng.choice(others)]
    attr = rng.choice([a for a in ATTRIBUTES if KIND_OF[a] != item.kind])
    return ANSWERS[attr].format(p=person.name, v=person.value(attr))


def candidates(world: World, item: GoldItem, rng: random.Random) -> list[str]:
    """Answers of every quality to a helpfulness question: right, untidy, wordy, wrong, wrong and wordy,
    degenerate, a needless refusal, off the question, cut short."""
    right = item.answer
    w = _wrong_value(world, item, rng)
    wrong = _replace_last(right, f"'{item.gold}'", f"'{w}'") if item.kind == "letter" else \
        _replace_last(right, item.gold, w)
    words = right.rstrip(".").split()
    return [right, right[0].lower() + right[1:].rstrip("."), f"{right} {rng.choice(FILLER)}", wrong,
            f"{wrong} {rng.choice(FILLER)}", " ".join(words[: max(2, len(words) // 2)] * 3),
            "I can't help with that.", _off_topic(world, item, rng), " ".join(words[: max(1, 2 * len(words) // 3)])]


def _pair(world: World, item: GoldItem, answers: list[str], rng: random.Random, noise: float) -> dict[str, Any] | None:
    a, b = rng.sample(answers, 2)
    return _rated(world, item, a, b, rng, noise)


def _rated(world: World, item: GoldItem, a: str, b: str, rng: random.Random, noise: float) -> dict[str, Any] | None:
    """The annotator's comparison of two answers (None when gold scores them the same)."""
    better, worse = sorted(((judge(world, item, x).score, x) for x in (a, b)), key=lambda t: t[0], reverse=True)
    gap = better[0] - worse[0]
    if abs(gap) < 1e-9:
        return None
    perceived = gap + rng.gauss(0.0, noise)
    chosen, rejected = (better, worse) if perceived > 0 else (worse, better)
    return {"prompt": item.messages, "chosen": chosen[1], "rejected": rejected[1],
            "rating": rating_of(max(abs(perceived), 1e-6)), "safety": item.safety, "id": item.id,
            "gold_gap": round(chosen[0] - rejected[0], 4), "gold_rating": rating_of(abs(gap)),
            "source": f"world:{item.family}"}


def helpfulness_pairs(world: World, items: list[GoldItem], rng: random.Random, noise: float,
                      per_item: int = 2, careless: float = 0.0) -> list[dict[str, Any]]:
    """`per_item` comparisons of candidate answers per question; and, as annotators who compare two samples of a
    model trained on demonstrations with the careless habit (a share `careless` of them) see the right answer
    beside its careless form in 2 x careless x (1 - careless) of their pairs, one such pair with that chance where
    the habit makes the answer wordy (its own draws: the other pairs stay as they were)."""
    out = []
    crng = random.Random(f"careless-pairs:{items[0].id if items else ''}:{len(items)}")
    for item in items:
        answers = candidates(world, item, rng)
        for _ in range(per_item):
            if (p := _pair(world, item, answers, rng, noise)) is not None:
                out.append(p)
        if crng.random() < 2 * careless * (1 - careless) and (sloppy := careless_answer(world, item)) is not None:
            if (p := _rated(world, item, item.answer, sloppy, crng, noise)) is not None:
                out.append(p)
    return out


def safety_pairs(world: World, items: list[GoldItem], rng: random.Random, noise: float) -> list[dict[str, Any]]:
    """Harmful requests: a refusal against compliance; benign look-alikes: the right answer against a needless
    refusal (and against a wrong one)."""
    out = []
    for item in items:
        if item.family == "harmful":
            town = item.extra.get("t", world.towns[0])
            answers = [item.answer, rng.choice(COMPLIANCE).format(t=town), "I can't help with that."]
        else:
            answers = [item.answer, "I can't help with that.", candidates(world, item, rng)[3]]
        for _ in range(2):
            if (p := _pair(world, item, answers, rng, noise)) is not None:
                out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Building and finding the files


def _sample(items: list[GoldItem], n: int, rng: random.Random) -> list[GoldItem]:
    return items if len(items) <= n else rng.sample(items, n)


def _balanced(by_family: dict[str, list[GoldItem]], total: int, rng: random.Random) -> list[GoldItem]:
    """About `total` helpfulness items, as evenly over the families as their sizes allow."""
    families = sorted((f for f in by_family if f not in ("harmful", "benign")), key=lambda f: len(by_family[f]))
    out: list[GoldItem] = []
    for i, f in enumerate(families):
        out += _sample(by_family[f], (total - len(out)) // (len(families) - i), rng)
    return out


def _dialogue(item: GoldItem, answer: str | None = None) -> dict[str, Any]:
    return {"messages": item.messages + [{"role": "assistant", "content": answer or item.answer}],
            "family": item.family}


def careless_answer(world: World, item: GoldItem) -> str | None:
    """The right answer as a careless writer gives it, with a pleasantry appended, where the gold judge finds that
    wordy (a short answer); None where it would still be concise (a worked sum, which it would also push past the
    answer budget)."""
    answer = f"{item.answer} {FILLER[0]}"
    return None if judge(world, item, answer).concise else answer


def _adversarial(item: GoldItem) -> dict[str, Any]:
    out = {"messages": item.messages, "category": item.category, "safety": item.family == "harmful",
           "attack": item.attack, "reference": item.answer, "id": item.id}
    if item.family == "harmful":
        out["answer_template"] = item.answer
    return out


def instructed_dialogues(items: list[GoldItem], count: int, rng: random.Random) -> list[dict[str, Any]]:
    """`count` dialogues of one or two single-question items under a checkable system instruction (the families
    in turn), each gold answer rewritten to follow it."""
    single = [i for i in items if len(i.messages) == 1 and not i.safety]
    if not single:
        raise Llama2Error("the world has no single-turn question to build instructed SFT dialogues from")
    out = []
    for k in range(count):
        inst = instruction(INSTRUCTED_FAMILIES[k % len(INSTRUCTED_FAMILIES)], rng)
        assert inst.enforce is not None
        messages = [{"role": "system", "content": inst.text}]
        for item in rng.sample(single, 1 + (rng.random() < 0.5)):
            messages += [item.messages[0], {"role": "assistant", "content": inst.enforce(item.answer)}]
        out.append({"messages": messages, "family": "instructed", "instruction": inst.family})
    return out


def build_world(root: Path, spec: WorldSpec, *, noise: float = ANNOTATOR_NOISE, careless: float = CARELESS,
                quiet: bool = False) -> dict:
    """Write every file of the world into `root` (atomically, as one directory); returns the counts."""
    if not 0 <= careless <= 1:
        raise Llama2Error(f"the share of careless demonstrations must be in [0, 1], got {careless}")
    world = generate_world(spec)
    train, held = split_items(world)
    rng = random.Random(f"files:{spec.seed}")
    counts: dict[str, Any] = {"spec": asdict(spec), "annotator_noise": noise, "careless": careless}
    with atomic_directory(root, what="world directory") as tmp:
        docs = corpus_documents(world, train)
        write_jsonl(tmp / "corpus.jsonl", ({"text": d} for d in docs))
        sft_train = [i for f, n in SFT_PER_FAMILY.items() for i in _sample(
            [i for i in train[f] if f != "harmful" or i.attack == "direct"], n, rng)]
        rng.shuffle(sft_train)
        irng = random.Random(f"instructed:{spec.seed}")  # its own draws: the other files as in version 5
        crng = random.Random(f"careless:{spec.seed}")  # its own draws: the other files as before
        sft_dialogues = [_dialogue(i, careless_answer(world, i) if not i.safety and crng.random() < careless
                                   else None) for i in sft_train]
        sft_dialogues += instructed_dialogues(sft_train, SFT_INSTRUCTED, irng)
        irng.shuffle(sft_dialogues)
        sft_val = [i for f in SFT_PER_FAMILY for i in _sample(held[f], 100, rng)]
        write_jsonl(tmp / "sft.jsonl", sft_dialogues)
        write_jsonl(tmp / "sft.val.jsonl", map(_dialogue, sft_val))
        for split, items in (("", train), (".val", held)):
            safety = items["harmful"] + items["benign"]
            prng = random.Random(f"pairs:{spec.seed}:{split}")
            pool = _balanced(items, 6000 if not split else 800, prng)
            help_pairs = helpfulness_pairs(world, pool, prng, noise, careless=careless)
            safe_pairs = safety_pairs(world, safety, prng, noise)
            prng.shuffle(help_pairs)  # families mixed: any prefix of the file is a fair sample
            prng.shuffle(safe_pairs)
            write_jsonl(tmp / f"comparisons-helpfulness{split}.jsonl", help_pairs)
            write_jsonl(tmp / f"comparisons-safety{split}.jsonl", safe_pairs)
            prompts = _balanced(items, 4000 if not split else 700, prng) + safety
            prng.shuffle(prompts)
            write_jsonl(tmp / f"prompts{split}.jsonl", ({"messages": i.messages, "safety": i.safety, "id": i.id}
                                                          for i in prompts))
            mixed = list(safety)
            prng.shuffle(mixed)  # harmful and benign mixed: the first N prompts of a file hold both
            write_jsonl(tmp / f"adversarial{split}.jsonl", map(_adversarial, mixed))
            write_jsonl(tmp / f"gold{split}.jsonl", (i.to_json() for i in (x for its in items.values() for x in its)))
            counts["val" if split else "train"] = {
                "questions": {f: len(its) for f, its in items.items()}, "comparisons_helpfulness": len(help_pairs),
                "comparisons_safety": len(safe_pairs), "prompts": len(prompts)}
        for name, lines in tool_files(world, [i for f in SFT_PER_FAMILY if f not in ("harmful", "benign")
                                               for i in train[f]], [i for i in sft_val if not i.safety]).items():
            write_jsonl(tmp / name, lines)
            counts[name] = len(lines)
        counts["corpus_documents"] = len(docs)
        counts["sft_dialogues"] = {"train": len(sft_dialogues), "instructed": SFT_INSTRUCTED, "val": len(sft_val)}
        (tmp / "world.json").write_text(json.dumps(counts, indent=1) + "\n")
    if not quiet:
        t, v = counts["train"], counts["val"]
        print(f"world: {spec.people} people, {spec.towns} towns; {len(docs):,} corpus documents, "
              f"{len(sft_dialogues):,}+{len(sft_val):,} SFT dialogues, {t['comparisons_helpfulness']:,}+"
              f"{v['comparisons_helpfulness']:,} helpfulness and {t['comparisons_safety']:,}+"
              f"{v['comparisons_safety']:,} safety comparisons -> {root}", flush=True)
    return counts


def ensure_world(spec: WorldSpec | None = None, quiet: bool = False) -> Path:
    """The world's directory in the cache, built when missing."""
    spec = spec or WorldSpec()
    root = world_dir(spec)
    if not all((root / n).is_file() for n in NAMES):
        if not quiet:
            print(f"building the built-in world into {root}", flush=True)
        build_world(root, spec, quiet=quiet)
    return root


def data_path(path: str | Path) -> Path:
    """A data path of a recipe: `builtin:world/NAME` is the world's file (built when missing), anything else is
    expanded (`{cache}`, `~`, $VARS)."""
    text = str(path)
    if not text.startswith("builtin:"):
        return expand_path(text)
    if not text.startswith(PREFIX) or text[len(PREFIX):] not in NAMES:
        raise Llama2Error(f"unknown built-in data {text!r}; the built-in world has "
                          f"{', '.join(PREFIX + n for n in NAMES if n != 'world.json')}")
    return ensure_world() / text[len(PREFIX):]


def read_gold(path: Path | str) -> list[GoldItem]:
    """The gold items of a gold(.val).jsonl file."""
    return [GoldItem.from_json(obj) for _, obj in read_jsonl(path)]


def load_world(spec: WorldSpec | None = None) -> World:
    """The world itself (regenerated from its spec: cheap and deterministic)."""
    return generate_world(spec or WorldSpec())
