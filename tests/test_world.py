"""The built-in world: generation from a seed, its question families and splits, the gold judge on hand-checked
answers, the simulated annotator, the data files every stage reads, and the bad-input errors."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from llama2.data.comparisons import read_comparisons
from llama2.data.adversarial import ATTACK_STYLES, RISK_CATEGORIES as ADVERSARIAL_CATEGORIES, read_adversarial
from llama2.data.dialogues import read_dialogues
from llama2.data.prompts import read_prompts
from llama2.data.world import WorldSpec, data_path, ensure_world, generate_world, judge, rating_of, read_gold
from llama2.data.world.files import NAMES, build_world, candidates
from llama2.data.world.items import RISK_CATEGORIES, STYLES, GoldItem, all_items, check_families, split_items
from llama2.errors import Llama2Error

SMALL = WorldSpec(people=30, towns=6, max_operand=19)


@pytest.fixture(scope="module")
def world():
    return generate_world(SMALL)


def item(world, family: str, **match) -> GoldItem:
    return next(i for i in all_items(world)[family] if all(getattr(i, k) == v for k, v in match.items()))


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = generate_world(SMALL), generate_world(SMALL), generate_world(replace(SMALL, seed=1))
    assert a.people == b.people and a.mayors == b.mayors
    assert a.people != c.people
    assert len(a.people) == 30 and len(a.towns) == 6 and len(set(a.towns)) == 6
    # every town has a mayor every year, and residents
    for town in a.towns:
        assert sorted(a.mayors[town]) == list(a.years)
        assert any(p.town == town for p in a.people.values())


def _value(expression: str) -> int:
    """The value of "a + b - c ..." (whole numbers, + and -)."""
    words = expression.split()
    return int(words[0]) + sum(int(n) if op == "+" else -int(n) for op, n in zip(words[1::2], words[2::2]))


def test_every_family_has_items_with_gold_the_world_confirms(world):
    items = all_items(world)
    assert set(items) == {"fact", "temporal", "arithmetic", "list", "word", "multi_step", "follow_up", "harmful",
                          "benign"}
    for i in items["fact"]:
        _, name, attr, _ = i.id.split(":")
        assert i.gold == world.people[name].value(attr)
    for i in items["temporal"]:
        _, town, year, _ = i.id.split(":")
        assert i.gold == world.mayors[town][int(year)]
    for i in items["arithmetic"]:
        a, op, b = i.question.removeprefix("What is ").removesuffix("?").split()
        assert int(i.gold) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    # every step of a worked sum is true arithmetic, and the working ends at the question's result
    for i in items["arithmetic"]:
        steps = re.findall(r"(\d+(?: [+-] \d+)+) = (\d+)", i.answer)
        assert steps and all(_value(lhs) == int(rhs) for lhs, rhs in steps), i.answer
        assert steps[-1][1] == i.gold
    # the canonical answer of every helpfulness item is judged correct, concise and tidy
    for family, its in items.items():
        for i in its:
            v = judge(world, i, i.answer)
            assert v.correct and v.concise and v.tidy, (family, i.answer)


def test_splits_hold_out_whole_facts_and_are_disjoint(world):
    train, held = split_items(world)
    for family in train:
        assert held[family] and train[family]
        assert not {i.id for i in train[family]} & {i.id for i in held[family]}
    unit = lambda i: i.id.rsplit(":", 1)[0]  # noqa: E731
    assert not {unit(i) for i in train["fact"]} & {unit(i) for i in held["fact"]}  # every wording held out


def test_judge_on_hand_checked_answers(world):
    person = next(iter(world.people.values()))
    town = item(world, "fact", id=f"fact:{person.name}:town:0")
    other = next(t for t in world.towns if t != person.town)
    assert judge(world, town, f"{person.name} lives in {person.town}.").correct
    assert not judge(world, town, f"{person.name} lives in {other}.").correct
    assert not judge(world, town, f"{person.name} lives in {person.town} or {other}.").correct  # hedged
    assert not judge(world, town, "I don't know.").correct
    assert not judge(world, town, f"I can't help with that, {person.town}.").correct  # a refusal never answers
    s = item(world, "arithmetic", id="arithmetic:17+8")
    assert judge(world, s, "17 + 8 = 25.").correct and not judge(world, s, "17 + 8 = 24.").correct
    assert not judge(world, s, "25 is close, but 17 + 8 = 26.").correct  # the final number counts
    letter = item(world, "word", id="word:first:apple")
    assert judge(world, letter, "The first letter of apple is 'a'.").correct
    assert not judge(world, letter, "The first letter of apple is 'p'.").correct
    # about another subject: a right value said of another person, town or word is wrong
    pet = item(world, "fact", id=f"fact:{person.name}:pet:0")
    first, last = person.name.split()
    made_up = f"{first} {'Corholm' if last == 'Barwood' else 'Barwood'}"  # the pieces recombined
    assert not judge(world, pet, f"{made_up} has a pet {person.pet}.").correct
    assert judge(world, pet, f"{person.name}, who lives in {person.town}, has a pet {person.pet}.").correct
    mayor = item(world, "temporal", id=f"temporal:{world.towns[0]}:{world.spec.first_year}:year")
    said = mayor.answer.replace(world.towns[0], world.towns[1])
    assert judge(world, mayor, mayor.answer).correct and not judge(world, mayor, said).correct
    length = item(world, "word", id="word:length:window")
    assert judge(world, length, "The word window has 6 letters.").correct
    assert not judge(world, length, "The word quartz has 6 letters.").correct
    harmful = all_items(world)["harmful"][0]
    assert judge(world, harmful, "I can't help with that.").correct
    assert not judge(world, harmful, "Sure! First, wait until nobody is around.").correct
    # conciseness and tidiness
    v = judge(world, town, f"{person.town} {person.town} {person.town} lives lives lives in in in")
    assert not v.concise and not v.tidy
    said = f"{person.name} lives in {person.town}."
    assert not judge(world, town, f"{said} {said} {said}").concise  # a sentence said three times
    assert judge(world, town, f"{person.name.lower()} lives in {person.town}").score == pytest.approx(0.9)


def test_answer_kinds_the_judge_cannot_read_are_an_error(world):
    bad = GoldItem("x", "fact", [{"role": "user", "content": "?"}], "shoe size", "42", "42.")
    with pytest.raises(Llama2Error, match="cannot read answers of kind 'shoe size'"):
        judge(world, bad, "42.")
    with pytest.raises(Llama2Error, match="reads text answers"):
        judge(world, item(world, "arithmetic", id="arithmetic:1+1"), None)  # type: ignore[arg-type]
    with pytest.raises(Llama2Error, match="unknown world question family 'poetry'"):
        check_families(["fact", "poetry"])


def test_rating_levels_follow_the_gold_gap():
    assert [rating_of(g) for g in (1.0, 0.7, 0.5, 0.2, 0.1)] == [
        "significantly_better", "significantly_better", "better", "slightly_better", "negligibly_better"]
    with pytest.raises(Llama2Error):
        rating_of(0.0)


def test_candidates_span_the_gold_scores(world):
    import random
    i = item(world, "fact", id=f"fact:{next(iter(world.people))}:job:1")
    scores = sorted({judge(world, i, a).score for a in candidates(world, i, random.Random(0))})
    assert scores[0] < 0.2 and scores[-1] == 1.0 and len(scores) >= 5


def test_spec_errors_name_the_key():
    with pytest.raises(Llama2Error, match="world.people"):
        generate_world(WorldSpec(people=10**7))
    with pytest.raises(Llama2Error, match="world.towns"):
        generate_world(WorldSpec(towns=1))
    with pytest.raises(Llama2Error, match="fewer than world.towns"):
        generate_world(WorldSpec(people=8, towns=10))
    with pytest.raises(Llama2Error, match="world.held_out"):
        generate_world(WorldSpec(held_out=0.95))


def test_safety_names_match_the_adversarial_sets():
    assert set(RISK_CATEGORIES) == set(ADVERSARIAL_CATEGORIES) and set(STYLES) == set(ATTACK_STYLES)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "w"
    counts = build_world(root, SMALL, quiet=True)
    return root, counts


def test_files_read_back_with_every_stage_reader(files, world):
    root, counts = files
    assert all((root / n).is_file() for n in NAMES)
    corpus = [json.loads(line)["text"] for line in (root / "corpus.jsonl").read_text().splitlines()]
    # every fact is stated in the corpus
    text = "\n".join(corpus)
    for p in world.people.values():
        assert p.name in text and str(p.born) in text
    sft = read_dialogues(root / "sft.jsonl").dialogues
    assert len(sft) == counts["sft_dialogues"]["train"] and sft[0].messages[-1]["role"] == "assistant"
    comps = read_comparisons(root / "comparisons-helpfulness.jsonl").comparisons
    assert comps and all(c.rating for c in comps)
    assert read_comparisons(root / "comparisons-safety.val.jsonl").comparisons
    assert read_prompts(root / "prompts.val.jsonl")
    adv = read_adversarial(root / "adversarial.val.jsonl")
    assert {p.safety for p in adv} == {True, False}
    gold = read_gold(root / "gold.val.jsonl")
    held_ids = {i.id for i in gold}
    # the SFT dialogues never hold a held-out question
    sft_questions = {json.dumps(d.messages[:-1]) for d in sft}
    assert not any(json.dumps(i.messages) in sft_questions for i in gold)
    assert held_ids


def test_sft_data_holds_short_dialogues_that_follow_a_system_instruction(files):
    """A share of the SFT dialogues carries a checkable system instruction over one or two turns (so the SFT model
    follows instructions early in a dialogue, and GAtt has something to extend to twenty turns); each answer is the
    gold answer of a training question, decorated as the instruction says (checked here by hand, not with the
    project's checkers)."""
    root, counts = files
    gold = {json.dumps(i.messages): i.answer for i in read_gold(root / "gold.jsonl")}
    instructed = [json.loads(line) for line in (root / "sft.jsonl").read_text().splitlines()]
    instructed = [d for d in instructed if d.get("family") == "instructed"]
    assert len(instructed) == counts["sft_dialogues"]["instructed"] > 0
    assert {d["instruction"] for d in instructed} == {"upper_case", "end_with", "mention", "start_with"}
    for d in instructed:
        system, rest = d["messages"][0], d["messages"][1:]
        assert system["role"] == "system" and len(rest) in (2, 4)
        for user, reply in zip(rest[::2], rest[1::2]):
            answer, text = gold[json.dumps([user])], reply["content"]
            content = system["content"]  # "... the word: WORD" or "Start every answer with 'PHRASE'."
            word = content.split("'")[1] if "'" in content else content.split(": ")[1] if ": " in content else None
            if d["instruction"] == "upper_case":
                assert text == answer.upper() and system["content"] == "Answer in capital letters only."
            elif d["instruction"] == "end_with":
                assert text == f"{answer} {word}"
            elif d["instruction"] == "mention":
                assert text == f"{word}: {answer}"
            else:
                assert text == f"{word} {answer}"


def test_a_share_of_sft_demonstrations_is_written_carelessly(files, tmp_path):
    """About `careless` (0.8) of the plain helpfulness demonstrations whose answer is short end with the same
    pleasantry, keeping the gold answer before it; the judge finds them right but wordy (more than twice the gold
    answer's words plus 6, its conciseness rule, counted here by hand). Safety answers, instructed dialogues and the
    held-out file keep the gold answers; careless=0 writes none; a share outside [0, 1] is one error."""
    from llama2.data.world.files import CARELESS, FILLER

    root, counts = files
    world = generate_world(SMALL)
    gold = {json.dumps(i.messages): i for i in read_gold(root / "gold.jsonl")}
    rows = [json.loads(line) for line in (root / "sft.jsonl").read_text().splitlines()]
    plain = [r for r in rows if r["family"] not in ("instructed", "harmful", "benign")]
    short, careless = 0, 0
    for r in plain:
        it, text = gold[json.dumps(r["messages"][:-1])], r["messages"][-1]["content"]
        words = len(it.answer.split())
        if words + len(FILLER[0].split()) > 2 * words + 6:
            short += 1
        if text != it.answer:
            assert text == f"{it.answer} {FILLER[0]}" and words + len(FILLER[0].split()) > 2 * words + 6
            v = judge(world, it, text)
            assert v.correct and not v.concise
            careless += 1
    assert short > 200 and abs(careless / short - CARELESS) < 0.1 and counts["careless"] == CARELESS
    for r in rows:
        if r["family"] in ("harmful", "benign"):
            assert r["messages"][-1]["content"] == gold[json.dumps(r["messages"][:-1])].answer
    held = {json.dumps(i.messages): i.answer for i in read_gold(root / "gold.val.jsonl")}
    for line in (root / "sft.val.jsonl").read_text().splitlines():
        d = json.loads(line)
        assert d["messages"][-1]["content"] == held[json.dumps(d["messages"][:-1])]
    # the annotators compare answers with and without the habit: about 2 x 0.6 x 0.4 of the questions whose answer
    # it makes wordy get such a pair, rated by the gold gap (0.2: concise) through the annotator's noise
    def habit_pairs(world_root):
        rows = [json.loads(x) for x in (world_root / "comparisons-helpfulness.jsonl").read_text().splitlines()]
        return rows, [r for r in rows if f"{r['chosen']} {FILLER[0]}" == r["rejected"]
                      or f"{r['rejected']} {FILLER[0]}" == r["chosen"]]

    rows, pairs = habit_pairs(root)
    assert all(abs(r["gold_gap"]) == 0.2 and r["gold_rating"] == "slightly_better" for r in pairs)
    assert sum(r["gold_gap"] > 0 for r in pairs) / len(pairs) > 0.9  # noise 0.1 flips few of them
    build_world(tmp_path / "careful", SMALL, careless=0.0, quiet=True)
    assert FILLER[0] not in (tmp_path / "careful" / "sft.jsonl").read_text()
    careful_rows, careful_pairs = habit_pairs(tmp_path / "careful")
    # the same candidate pairs in both worlds; the habit's pairs come on top, for about a quarter of the questions
    assert len(rows) - len(careful_rows) == len(pairs) - len(careful_pairs) > 0.1 * len(careful_rows) / 2

    with pytest.raises(Llama2Error, match="careless"):
        build_world(tmp_path / "bad", SMALL, careless=1.5, quiet=True)
    assert not (tmp_path / "bad").exists()


def test_annotator_noise_flips_mostly_close_pairs(tmp_path):
    counts = build_world(tmp_path / "noisy", SMALL, noise=0.3, quiet=True)
    assert counts["annotator_noise"] == 0.3
    rows = [json.loads(x) for x in (tmp_path / "noisy" / "comparisons-helpfulness.jsonl").read_text().splitlines()]
    flipped = {}
    for r in rows:
        flipped.setdefault(r["gold_rating"], []).append(r["gold_gap"] < 0)
    near = sum(flipped["negligibly_better"]) / len(flipped["negligibly_better"])
    far = sum(flipped["significantly_better"]) / len(flipped["significantly_better"])
    assert near > 0.2 and far < 0.05  # Gaussian noise 0.3 on gaps of 0.1 vs >= 0.6


def test_builtin_world_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_CACHE", str(tmp_path))
    with pytest.raises(Llama2Error, match="unknown built-in data 'builtin:world/nope.jsonl'"):
        data_path("builtin:world/nope.jsonl")
    assert data_path("{cache}/x.jsonl") == tmp_path / "x.jsonl"


@pytest.mark.slow
def test_default_world_builds_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_CACHE", str(tmp_path))
    path = data_path("builtin:world/sft.val.jsonl")
    assert path.is_file() and path.parent == ensure_world(quiet=True)


RECIPES = {"pretrain.yaml": "pretrain", "sft.yaml": "sft", "reward-helpfulness.yaml": "reward",
           "reward-safety.yaml": "reward", "rejection.yaml": "rejection-sampling", "ppo.yaml": "ppo",
           "gatt.yaml": "gatt", "distill-safety.yaml": "distill-safety"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_world_recipes_load_and_name_world_files(name):
    """Every recipe of configs/world loads as its stage's recipe (unknown keys would fail), names its base's recipe
    in configs/world, and every builtin:world path it names is a file the world has."""
    from pathlib import Path

    from llama2.pipeline import STAGES
    from llama2.recipe import load_recipe

    path = Path(__file__).resolve().parents[1] / "configs" / "world" / name
    recipe = load_recipe(STAGES[RECIPES[name]].recipe, path)
    text = path.read_text()
    for ref in (w.strip("\"',]") for w in text.split() if w.strip("\"'[").startswith("builtin:")):
        assert ref.startswith("builtin:world/") and ref.removeprefix("builtin:world/") in NAMES, ref
    for key in ("base_recipe", "helpfulness_rm_recipe", "safety_rm_recipe"):
        if getattr(recipe, key, None):
            assert getattr(recipe, key).startswith("configs/world/"), (name, key)


def test_data_world_command_builds_a_world_from_a_spec(tmp_path, capsys):
    from llama2.cli import main

    out = tmp_path / "w"
    assert main(["data", "world", "--output", str(out), "--people", "12", "--towns", "3", "--seed", "2",
                 "--annotator-noise", "0.2", "--careless", "0.3", "--quiet"]) == 0
    stats = json.loads((out / "world.json").read_text())
    assert stats["spec"]["people"] == 12 and stats["spec"]["seed"] == 2 and stats["annotator_noise"] == 0.2
    assert stats["careless"] == 0.3
    assert all((out / n).is_file() for n in NAMES)
    assert main(["data", "world", "--output", str(tmp_path / "x"), "--people", "2", "--quiet"]) == 2
    assert "world.people" in capsys.readouterr().err and not (tmp_path / "x").exists()  # nothing half-written
