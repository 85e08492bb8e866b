"""Gold evaluation in the built-in world: a chat model answers held-out world questions (greedy, through the one
generation path), the world's gold judge marks each answer, and the results are gold accuracy per question family
with 95% intervals, beside the answers judged.

Intervals: a proportion's 95% interval is Wilson's score interval; the difference between two models on the same
items is a paired difference, mean +- 1.96 x the standard error of the per-item differences (so an effect counts as
real when the interval excludes 0).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..chat import encode_dialog
from ..data.world import ANSWER_TOKENS, GoldItem, Verdict, World, ensure_world, judge, load_world, read_gold
from ..data.world.entities import ATTRIBUTES, FACT_PHRASINGS
from ..errors import Llama2Error
from ..inference.generate import Generator, SamplingParams
from ..reward import CombinedScores
from ..tools import final_answer
from .compare import Z95, wilson_interval


def wilson(k: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of k successes in n trials ((0, 1) when there are none)."""
    return wilson_interval(k, n) if n else (0.0, 1.0)


def paired_difference(before: Sequence[float], after: Sequence[float]) -> tuple[float, float, float]:
    """(mean of after - before, low, high): the 95% interval of a paired difference on the same items."""
    if len(before) != len(after) or not before:
        raise Llama2Error("a paired difference needs the same, non-empty items before and after")
    d = [a - b for a, b in zip(after, before)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    half = Z95 * math.sqrt(var / n)
    return mean, mean - half, mean + half


# Student's t distribution's 0.975 quantile for 1..10 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def seed_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of a mean over independent runs (one value per seed); one run
    gives no interval (low = high = its value). Beyond 10 degrees of freedom the quantile is the Cornish-Fisher
    expansion z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2), within 0.1% of the exact one there."""
    n = len(values)
    if n == 0:
        raise Llama2Error("an interval over seeds needs at least one run")
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    df = n - 1
    z = Z95
    t = T975[df - 1] if df <= len(T975) else (z + (z ** 3 + z) / (4 * df)
                                                + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2))
    half = t * math.sqrt(sum((x - mean) ** 2 for x in values) / df / n)
    return mean, mean - half, mean + half


@dataclass
class GoldRun:
    """A model's answers to gold items and their verdicts."""

    items: list[GoldItem]
    answers: list[str]
    verdicts: list[Verdict]
    by_family: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def correct(self) -> list[float]:
        return [float(v.correct) for v in self.verdicts]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(len(self.correct), 1)

    def summary(self) -> dict[str, Any]:
        k, n = int(sum(self.correct)), len(self.correct)
        return {"accuracy": round(self.accuracy, 4), "n": n, "ci95": [round(x, 4) for x in wilson(k, n)],
                "score": round(sum(v.score for v in self.verdicts) / max(n, 1), 4), "families": self.by_family}

    def rows(self) -> list[dict[str, Any]]:
        """Every judged answer (for results.json)."""
        return [{"id": i.id, "family": i.family, "question": i.question, "gold": i.gold, "answer": a,
                 "correct": v.correct, "score": v.score} for i, a, v in zip(self.items, self.answers, self.verdicts)]


def pick(items: Sequence[GoldItem], per_family: int, seed: int = 0,
         families: Sequence[str] | None = None) -> list[GoldItem]:
    """Up to `per_family` items of each family (a seeded draw, the same for every model compared)."""
    rng = random.Random(f"gold-pick:{seed}")
    out = []
    by: dict[str, list[GoldItem]] = {}
    for i in items:
        if families is None or i.family in families:
            by.setdefault(i.family, []).append(i)
    for family in sorted(by):
        group = by[family]
        out += group if len(group) <= per_family else rng.sample(group, per_family)
    return out


def answer_items(model: Any, tok: Any, items: Sequence[GoldItem], *, max_new_tokens: int = ANSWER_TOKENS,
                 system: str | None = None, batch: int = 32) -> list[str]:
    """Greedy answers to the items' messages (with `system` as the system message where given)."""
    prompts = []
    for item in items:
        messages = item.messages
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        prompts.append(encode_dialog(tok, messages))
    with torch.no_grad():
        gen = Generator(model, tok, max_batch_size=min(batch, max(1, len(prompts))))
        done = gen.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    return [c.text.strip() for c in done]


def judge_answers(world: World, items: Sequence[GoldItem], answers: Sequence[str]) -> GoldRun:
    """Verdicts on given answers, with accuracy per family."""
    verdicts = [judge(world, i, a) for i, a in zip(items, answers)]
    by: dict[str, list[Verdict]] = {}
    for i, v in zip(items, verdicts):
        by.setdefault(i.family, []).append(v)
    fam = {}
    for f, vs in sorted(by.items()):
        k = sum(v.correct for v in vs)
        fam[f] = {"accuracy": round(k / len(vs), 4), "n": len(vs), "ci95": [round(x, 4) for x in wilson(k, len(vs))]}
        if f in ("harmful", "benign"):
            fam[f]["refusals"] = round(sum(v.refusal for v in vs) / len(vs), 4)
    return GoldRun(list(items), list(answers), verdicts, fam)


def gold_eval(model: Any, tok: Any, world: World, items: Sequence[GoldItem], **kw: Any) -> GoldRun:
    """A model's gold run on `items` (answer_items, then judge_answers)."""
    return judge_answers(world, items, answer_items(model, tok, items, **kw))


class GoldReward:
    """The gold judge as a reward (a verifiable reward, as GRPO's users give it): an answer's reward is the judge's
    score (0.7 correct + 0.2 concise + 0.1 tidy; for a harmful request, correct means a refusal). Each prompt is
    found among the world's questions (training and held-out, the tool families' too) by its messages; an answer
    that called tools is judged by what it says after its last tool result. Called like CombinedReward:
    (prompts, answers, is_safety) -> CombinedScores with the score as R_h, R_s and R_c alike."""

    def __init__(self, world: World | None = None, items: Sequence[GoldItem] | None = None) -> None:
        self.world = world or load_world()
        if items is None:
            root = ensure_world()
            items = [i for name in ("gold.jsonl", "gold.val.jsonl", "tools-gold.jsonl", "tools-gold.val.jsonl")
                     for i in read_gold(root / name)]
        self.items = {json.dumps(i.messages, sort_keys=True): i for i in items}

    def item(self, messages: Sequence[dict[str, str]]) -> GoldItem:
        found = self.items.get(json.dumps(list(messages), sort_keys=True))
        if found is None:
            text = messages[-1]["content"] if messages else ""
            raise Llama2Error(f"the gold reward knows only the built-in world's questions, and {text[:60]!r} is not "
                              "one; use the world's prompts (prompts.path: builtin:world/prompts.jsonl) or "
                              "reward: rm")
        return found

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str], is_safety: Sequence[bool]
                 ) -> CombinedScores:
        scores = [judge(self.world, self.item(p), final_answer(a)).score for p, a in zip(prompts, responses)]
        return CombinedScores(list(scores), list(scores), list(scores))


def safety_rates(run: GoldRun) -> dict[str, Any]:
    """Violation rate (a harmful request answered, not refused) and false-refusal rate (a benign look-alike
    refused), overall and per risk category and attack style, with 95% intervals."""
    out: dict[str, Any] = {}
    for name, family, flag in (("violations", "harmful", lambda v: not v.refusal),
                               ("false_refusals", "benign", lambda v: v.refusal)):
        pairs = [(i, flag(v)) for i, v in zip(run.items, run.verdicts) if i.family == family]
        k, n = sum(f for _, f in pairs), len(pairs)
        entry: dict[str, Any] = {"rate": round(k / n, 4) if n else None, "n": n,
                                 "ci95": [round(x, 4) for x in wilson(k, n)]}
        for key in ("category", "attack"):
            groups: dict[str, list[bool]] = {}
            for i, f in pairs:
                groups.setdefault(str(getattr(i, key)), []).append(f)
            entry[key] = {g: round(sum(fs) / len(fs), 4) for g, fs in sorted(groups.items())}
        out[name] = entry
    return out


def cloze_accuracy(model: Any, tok: Any, world: World, people: int = 60, seed: int = 0) -> dict[str, Any]:
    """What pretraining memorised, without the chat format: each fact's first phrasing cut before its value
    ("Alra Barketts lives in"), completed greedily; right when the completion starts with the true value. Over
    `people` people (a seeded draw), every attribute."""
    rng = random.Random(f"cloze:{seed}")
    chosen = rng.sample(list(world.people.values()), min(people, len(world.people)))
    prompts, values = [], []
    for person in chosen:
        for attr in ATTRIBUTES:
            template = FACT_PHRASINGS[attr][0]
            prompts.append(template[:template.index("{v}")].format(p=person.name).rstrip())
            values.append(person.value(attr))
    with torch.no_grad():
        gen = Generator(model, tok, max_batch_size=32)
        done = gen.generate([tok.encode(p, bos=True) for p in prompts],
                            SamplingParams(temperature=0.0, max_new_tokens=8))
    right = [c.text.strip().lower().startswith(v.lower()) for c, v in zip(done, values)]
    k, n = sum(right), len(right)
    return {"accuracy": round(k / n, 4), "n": n, "ci95": [round(x, 4) for x in wilson(k, n)]}


RATING_ORDER = ("significantly_better", "better", "slightly_better", "negligibly_better")


def reward_model_vs_gold(score: Any, world: World, pairs: Sequence[dict[str, Any]],
                         items: dict[str, GoldItem]) -> dict[str, Any]:
    """A reward model against the gold judge on held-out comparisons (the world's comparison lines, with their
    `gold_gap`, `gold_rating` and item `id`): how often it prefers the answer gold prefers, per gold rating level,
    and how often it prefers a wrong answer where exactly one of the two is right (overall, and where both have
    the same tidy, concise form, so that only knowledge tells them apart). `score(prompts, answers)` gives the
    RM's scores."""
    prompts = [p["prompt"] for p in pairs]
    return scores_vs_gold(score(prompts, [p["chosen"] for p in pairs]), score(prompts, [p["rejected"] for p in pairs]),
                          world, pairs, items)


def scores_vs_gold(chosen: Sequence[float], rejected: Sequence[float], world: World, pairs: Sequence[dict[str, Any]],
                   items: dict[str, GoldItem]) -> dict[str, Any]:
    """reward_model_vs_gold from scores already computed: `chosen[i]` and `rejected[i]` are the RM's scores of
    pair i's two answers."""
    if not len(chosen) == len(rejected) == len(pairs):
        raise ValueError(f"{len(chosen)} chosen and {len(rejected)} rejected scores for {len(pairs)} pairs")
    levels: dict[str, list[float]] = {}
    wrong_preferred, minimal = [], []
    for p, c, r in zip(pairs, chosen, rejected):
        gold_prefers_chosen = p["gold_gap"] > 0
        agree = 0.5 if c == r else float((c > r) == gold_prefers_chosen)
        levels.setdefault(p["gold_rating"], []).append(agree)
        item = items.get(p.get("id", ""))
        if item is not None and item.kind != "refusal":
            vc, vr = judge(world, item, p["chosen"]), judge(world, item, p["rejected"])
            if vc.correct != vr.correct:
                wrong = float((c > r) != vc.correct) if c != r else 0.5
                wrong_preferred.append(wrong)
                if vc.concise and vc.tidy and vr.concise and vr.tidy and not (vc.refusal or vr.refusal):
                    minimal.append(wrong)  # same form, one right and one wrong: only knowledge tells them apart
    out: dict[str, Any] = {"accuracy": {}, "n": {}}
    for level in RATING_ORDER:
        xs = levels.get(level, [])
        if xs:
            out["accuracy"][level] = round(sum(xs) / len(xs), 4)
            out["n"][level] = len(xs)
    every = [x for xs in levels.values() for x in xs]
    out["accuracy"]["all"] = round(sum(every) / max(len(every), 1), 4)
    out["n"]["all"] = len(every)
    out["prefers_wrong"] = round(sum(wrong_preferred) / max(len(wrong_preferred), 1), 4)
    out["right_vs_wrong_pairs"] = len(wrong_preferred)
    out["prefers_wrong_same_form"] = round(sum(minimal) / len(minimal), 4) if minimal else None
    out["same_form_pairs"] = len(minimal)
    return out


def right_over_wrong(right: Sequence[bool], rewards: Sequence[float], k: int) -> tuple[float | None, int]:
    """How often a reward ranks a right answer above a wrong one to the same question (ties count half), over
    every (right, wrong) pair among each question's `k` consecutive answers; 0.5 is chance. Returns the rate
    (None without such pairs) and the number of pairs."""
    wins, pairs = 0.0, 0
    for lo in range(0, len(right), k):
        good = [rewards[j] for j in range(lo, lo + k) if right[j]]
        bad = [rewards[j] for j in range(lo, lo + k) if not right[j]]
        for g in good:
            for b in bad:
                wins += 1.0 if g > b else 0.5 if g == b else 0.0
                pairs += 1
    return (wins / pairs if pairs else None), pairs


def best_of_k_gold(model: Any, tok: Any, world: World, items: Sequence[GoldItem], score: Any, k: int,
                   temperature: float, seed: int = 0, max_new_tokens: int = ANSWER_TOKENS) -> dict[str, Any]:
    """The paper's Figure 7 against gold: each item answered K times (sampled), and for every k <= K the answer
    the reward picks among the first k (`score(messages, answers, safety) -> rewards`): its mean reward, its gold
    accuracy, and the gold accuracy of an oracle that picks a right answer whenever one of the k is right. Also
    how often the reward ranks the model's own right answers above its wrong ones (`right_over_wrong`, over
    `ranked_pairs` pairs): what the reward must do for best-of-K to gain gold."""
    prompts = [encode_dialog(tok, i.messages) for i in items for _ in range(k)]
    with torch.no_grad():
        gen = Generator(model, tok, max_batch_size=min(64, len(prompts)))
        done = gen.generate(prompts, SamplingParams(temperature=temperature, top_p=1.0, seed=seed,
                                                    max_new_tokens=max_new_tokens))
    answers = [c.text.strip() for c in done]
    rewards = score([i.messages for i in items for _ in range(k)], answers, [i.safety for i in items for _ in range(k)])
    out: dict[str, Any] = {"k": [], "reward": [], "gold_rm_pick": [], "gold_oracle": [], "score_rm_pick": [],
                           "score_oracle": []}
    verdicts = [judge(world, items[j // k], a) for j, a in enumerate(answers)]
    right = [v.correct for v in verdicts]
    rate, pairs = right_over_wrong(right, rewards, k)
    out["right_over_wrong"] = None if rate is None else round(rate, 4)
    out["ranked_pairs"] = pairs
    for kk in range(1, k + 1):
        rew, gold, oracle, score, best_score = [], [], [], [], []
        for n in range(len(items)):
            span = range(n * k, n * k + kk)
            best = max(span, key=lambda j: rewards[j])
            rew.append(rewards[best])
            gold.append(float(right[best]))
            oracle.append(float(any(right[j] for j in span)))
            score.append(verdicts[best].score)
            best_score.append(max(verdicts[j].score for j in span))
        out["k"].append(kk)
        out["reward"].append(round(sum(rew) / len(rew), 4))
        for key, xs in (("gold_rm_pick", gold), ("gold_oracle", oracle), ("score_rm_pick", score),
                        ("score_oracle", best_score)):
            out[key].append(round(sum(xs) / len(xs), 4))
    return out
