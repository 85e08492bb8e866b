"""Gold evaluation: the intervals against scipy's, paired differences against numpy, reward models against the
gold judge on hand-built pairs, the safety rates, and `llama2 eval gold` on a tiny model end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from llama2.data.world import WorldSpec, generate_world
from llama2.data.world.items import all_items
from llama2.eval.gold import (
    judge_answers,
    paired_difference,
    reward_model_vs_gold,
    right_over_wrong,
    safety_rates,
    seed_interval,
    wilson,
)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (50, 60), (60, 60), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson(k, n)
    # scipy uses the exact normal quantile; ours 1.96
    assert lo == pytest.approx(ci.low, abs=2e-4) and hi == pytest.approx(ci.high, abs=2e-4)


def test_paired_difference_matches_numpy():
    rng = np.random.default_rng(0)
    before = rng.integers(0, 2, 200).astype(float)
    after = np.clip(before + rng.integers(0, 2, 200) * (rng.random(200) < 0.3), 0, 1)
    mean, lo, hi = paired_difference(list(before), list(after))
    d = after - before
    half = stats.norm.ppf(0.975) * d.std(ddof=1) / np.sqrt(len(d))
    assert mean == pytest.approx(d.mean()) and lo == pytest.approx(d.mean() - half) and hi == pytest.approx(
        d.mean() + half)


@pytest.mark.parametrize("n", [2, 3, 5, 10, 11, 12, 30, 200])
def test_interval_over_seeds_matches_scipys_student_t(n):
    values = list(np.random.default_rng(n).normal(2.0, 3.0, n))
    lo_ref, hi_ref = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=stats.sem(values))
    mean, lo, hi = seed_interval(values)
    assert mean == pytest.approx(np.mean(values))
    assert hi - mean == pytest.approx(hi_ref - np.mean(values), rel=1e-3) and mean - lo == pytest.approx(hi - mean)
    assert seed_interval([1.5]) == (1.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldSpec(people=20, towns=4, max_operand=19))


def test_right_over_wrong_is_the_pooled_mann_whitney_statistic():
    """The share of (right, wrong) sample pairs of one question that a reward ranks right-first, ties half, pooled
    over questions: scipy's Mann-Whitney U summed over the questions, over the pairs counted."""
    rng = np.random.default_rng(0)
    k, questions = 6, 40
    right = rng.random(k * questions) < 0.4
    rewards = np.round(rng.normal(size=k * questions) + 0.5 * right, 1)  # rounded: ties happen
    u = pairs = 0.0
    for lo in range(0, k * questions, k):
        good, bad = rewards[lo:lo + k][right[lo:lo + k]], rewards[lo:lo + k][~right[lo:lo + k]]
        if len(good) and len(bad):
            u += stats.mannwhitneyu(good, bad).statistic
            pairs += len(good) * len(bad)
    rate, n = right_over_wrong(right.tolist(), rewards.tolist(), k)
    assert n == pairs and rate == pytest.approx(u / pairs, abs=1e-12)
    assert right_over_wrong([True, True, False, False], [1.0, 2.0, 3.0, 4.0], 2) == (None, 0)


def test_reward_model_against_gold_on_hand_built_pairs(world):
    items = all_items(world)
    fact = items["fact"][0]
    other = next(t for t in world.towns if t != fact.gold) if fact.kind == "town" else None
    wrong = fact.answer.replace(fact.gold, other or "x")
    pairs = [  # chosen/rejected as a noisy annotator gave them; gold_gap > 0 where gold agrees
        {"prompt": fact.messages, "chosen": fact.answer, "rejected": wrong, "gold_gap": 0.7,
         "gold_rating": "significantly_better", "id": fact.id},
        {"prompt": fact.messages, "chosen": wrong, "rejected": fact.answer, "gold_gap": -0.7,
         "gold_rating": "significantly_better", "id": fact.id},  # the annotator flipped this one
        {"prompt": fact.messages, "chosen": fact.answer, "rejected": fact.answer + " I hope this helps a lot.",
         "gold_gap": 0.2, "gold_rating": "slightly_better", "id": fact.id},
    ]

    def shortest_wins(prompts, answers):  # a "reward model" that likes short answers
        return [-float(len(a)) for a in answers]

    r = reward_model_vs_gold(shortest_wins, world, pairs, {fact.id: fact})
    # pair 1: the right answer is as long as the wrong one (same-length town names tie at 0.5) or not;
    # work the expected agreement out from the lengths directly
    agree = []
    for p in pairs[:2]:
        c, rj = -len(p["chosen"]), -len(p["rejected"])
        agree.append(0.5 if c == rj else float((c > rj) == (p["gold_gap"] > 0)))
    assert r["accuracy"]["significantly_better"] == pytest.approx(sum(agree) / 2)
    assert r["accuracy"]["slightly_better"] == 1.0  # the shorter, tidy answer is gold's choice
    assert r["n"] == {"significantly_better": 2, "slightly_better": 1, "all": 3}
    assert r["right_vs_wrong_pairs"] == 2  # the wordy pair has two right answers


def test_safety_rates_by_category_and_style(world):
    items = all_items(world)
    harmful = items["harmful"][:6]
    benign = items["benign"][:4]
    answers = ["I can't help with that."] * 3 + ["Sure, here is how."] * 3 + [i.answer for i in benign[:3]] + [
        "I can't help with that."]
    run = judge_answers(world, harmful + benign, answers)
    rates = safety_rates(run)
    assert rates["violations"]["rate"] == 0.5 and rates["violations"]["n"] == 6
    assert rates["false_refusals"]["rate"] == 0.25 and rates["false_refusals"]["n"] == 4
    cats = {i.category for i in harmful}
    assert set(rates["violations"]["category"]) == cats
    assert run.by_family["benign"]["accuracy"] == 0.75


@pytest.mark.slow
def test_eval_gold_command_on_a_tiny_model(tmp_path, monkeypatch, tok, capsys):
    from helpers import serve_model

    from llama2.checkpoint import save_model
    from llama2.cli import main

    tiny_checkpoint = tmp_path / "tiny"
    save_model(serve_model(), tiny_checkpoint, tokenizer=tok)
    monkeypatch.setenv("LLAMA2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gold.json"
    assert main(["eval", "gold", str(tiny_checkpoint), "--per-family", "3", "--families", "fact,arithmetic,harmful",
                 "--max-new-tokens", "4", "--output", str(out)]) == 0
    data = json.loads(out.read_text())[str(tiny_checkpoint)]
    assert data["summary"]["n"] == 9 and len(data["answers"]) == 9
    assert set(data["summary"]["families"]) == {"fact", "arithmetic", "harmful"}
    assert data["safety"]["false_refusals"]["rate"] is None  # no benign look-alikes asked
    assert main(["eval", "gold", str(tiny_checkpoint), "--families", "poetry"]) == 2
    assert "unknown world question family 'poetry'" in capsys.readouterr().err


def test_best_of_k_against_gold_follows_the_rewards_pick(world, tok):
    """Figure 7 against gold on a tiny model's samples: for each K, the pick is the highest reward among the first
    K samples, and its accuracy and gold score, the oracle's accuracy and the best score among the K are those the
    judge gives (recomputed here from the sampled answers the reward saw)."""
    from helpers import serve_model

    from llama2.data.world import judge
    from llama2.eval.gold import best_of_k_gold

    items = [i for f in ("fact", "list", "arithmetic") for i in all_items(world)[f][:2]]
    seen: list[str] = []

    def prefer_short(answers):
        return [-len(a) + 0.01 * n for n, a in enumerate(answers)]  # no ties

    def reward(messages, answers, safety):
        seen.extend(answers)
        return prefer_short(answers)

    k = 4
    out = best_of_k_gold(serve_model().eval(), tok, world, items, reward, k, 1.0, seed=0, max_new_tokens=6)
    assert len(seen) == k * len(items) and out["k"] == list(range(1, k + 1))
    rewards = prefer_short(seen)
    for kk in range(1, k + 1):
        picks = [max(range(n * k, n * k + kk), key=lambda j: rewards[j]) for n in range(len(items))]
        verdicts = [judge(world, items[j // k], seen[j]) for j in range(len(seen))]
        assert out["gold_rm_pick"][kk - 1] == pytest.approx(np.mean([verdicts[j].correct for j in picks]), abs=1e-4)
        assert out["score_rm_pick"][kk - 1] == pytest.approx(np.mean([verdicts[j].score for j in picks]), abs=1e-4)
        best = [max(verdicts[j].score for j in range(n * k, n * k + kk)) for n in range(len(items))]
        assert out["score_oracle"][kk - 1] == pytest.approx(np.mean(best), abs=1e-4)
        assert out["score_oracle"][kk - 1] >= out["score_rm_pick"][kk - 1]
