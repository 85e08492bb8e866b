"""6. Rejection sampling: two iterations of rejection-sampling fine-tuning from the SFT model with the demo's two
RMs, on as many built-in prompts as the section's time allows; the best-of-K curves (Figure 7) and held-out
rewards per iteration, held-out answers before and after."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ...checkpoint import load_checkpoint
from ...data.prompts import builtin_prompts
from ...eval.gold import best_of_k_gold, pick
from ...figures import pyplot, save_png
from ...paths import latest_checkpoint
from ...reward import CombinedReward, RewardModel
from ...stages.rejection import RejectionRecipe, rejection_sampling
from ...tokenizer import Tokenizer
from ..report import Section
from .artifacts import ChatModel, Policy, RewardModels
from .common import Demo, Done, copy_figure, need, sized
from .gold import effect, effect_text, gold_table, helpful_accuracy, helpful_score, run_results

BEST_OF_K_ITEMS = 56  # held-out questions of the gold best-of-K curve (8 per helpfulness family)
SECONDS_PER_PROMPT = 0.8  # measured: both iterations, sweep and fine-tuning included, per training prompt
FLOOR_S, FULL_S = 8.0, 10.0  # seconds on 8 prompts at the smallest (sweep 2, held out 6) and full size, 2 idle cores
# In the world, fewer than ~30 prompts leave too little to fine-tune on (17 prompts in a seed-0 demo at pace 3.33:
# gold score +3.8, against +8 to +12 with 25-54 prompts in three others); the gold measurement follows (~20 s there)
WORLD_MIN_PROMPTS, WORLD_FLOOR_S = 32, 14.0


def rejection_gold(demo: Demo, section: Section, sft: Path, rms: RewardModels, run_dir: Path,
                   records: dict[int, dict[str, Any]], recipe: RejectionRecipe) -> None:
    """Gold accuracy of each iteration's policy, and Figure 7 against gold: best-of-K picked by the reward models,
    judged by the gold judge, beside an oracle's pick."""
    bench = demo.gold
    policies = {0: sft} | {i: latest_checkpoint(run_dir / f"iter-{i}" / "sft") for i in sorted(records) if i > 0}
    runs = {("SFT (V0)" if i == 0 else f"V{i}"): bench.measure(path) for i, path in policies.items() if path}
    names = list(runs)
    change = effect(runs[names[0]], runs[names[-1]])
    gold_table(section, runs, f"Gold per iteration on held-out world questions; {names[0]} -> {names[-1]}: accuracy "
                              f"{effect_text(change)} (95% intervals, paired)")
    scorer = CombinedReward(RewardModel.load(rms.helpfulness), RewardModel.load(rms.safety))
    items = pick(bench.helpful(), BEST_OF_K_ITEMS // 7, seed=demo.seed)
    temperature = records[1].get("temperature", 1.0) if 1 in records else 1.0
    curves = best_of_k_gold(load_checkpoint(sft).eval(), Tokenizer(sft), bench.world, items,
                            lambda m, a, s: scorer(m, a, s).combined, recipe.samples_per_prompt,
                            float(temperature), seed=demo.seed)
    figure = best_of_k_figure(curves, demo.out / "figures" / "rejection" / "gold_best_of_k.png")
    section.figure(figure, f"Figure 7 against gold: the SFT model's {recipe.samples_per_prompt} samples (temperature "
                           f"{temperature}) per held-out question ({len(items)} questions); for each K, the mean "
                           "reward of the answer the RMs pick among the first K, its gold accuracy and gold "
                           "score, the gold accuracy of an oracle that picks a right answer whenever there is one, "
                           "and the best gold score among the K; among those samples " + ranking_text(curves))
    demo.results.setdefault("gold", {})["rejection"] = {
        "iterations": {n: run_results(r) for n, r in runs.items()}, "change": change,
        "accuracy": [round(helpful_accuracy(r), 4) for r in runs.values()],
        "score": [round(helpful_score(r), 2) for r in runs.values()], "best_of_k": curves}


def ranking_text(curves: dict[str, Any]) -> str:
    """Where best-of-K's gain must come from: how the RMs rank the policy's own right and wrong samples."""
    if curves.get("right_over_wrong") is None:
        return "no question had both a right and a wrong sample"
    return (f"the RMs rank a right sample above a wrong one to the same question in {curves['right_over_wrong']:.0%} "
            f"of {curves['ranked_pairs']} pairs (50% is chance)")


def best_of_k_figure(curves: dict[str, list[float]], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(curves["k"], [100 * x for x in curves["gold_rm_pick"]], "o-", color="tab:blue",
            label="gold accuracy of the RMs' pick")
    ax.plot(curves["k"], [100 * x for x in curves["gold_oracle"]], "s--", color="tab:green",
            label="gold accuracy of an oracle's pick")
    if curves.get("score_rm_pick"):
        ax.plot(curves["k"], [100 * x for x in curves["score_rm_pick"]], "D-", color="tab:purple",
                label="gold score of the RMs' pick")
        ax.plot(curves["k"], [100 * x for x in curves["score_oracle"]], "d--", color="tab:olive",
                label="best gold score among the K")
    ax.set_xlabel("K (samples per question)")
    ax.set_ylabel("gold accuracy (%) and score (points)")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(curves["k"], curves["reward"], "^:", color="tab:red", label="mean R_c of the RMs' pick")
    ax2.set_ylabel("combined reward R_c", color="tab:red")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8, framealpha=0.9)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(fig, path)


def run(demo: Demo, section: Section, chat: ChatModel | None, rms: RewardModels | None) -> Done[Policy]:
    message = "rejection sampling needs the SFT model and both reward models, and they did not finish"
    sft, rms = need(chat, message).checkpoint, need(rms, message)
    run_dir = demo.run_dir("rejection")
    left = demo.budget.left("rejection")
    least = WORLD_MIN_PROMPTS if demo.world == "world" and demo.budget.holds_floors() else 8
    prompts = int(min(128, max(least, left / SECONDS_PER_PROMPT)))
    overrides = [f"base={sft}", f"helpfulness_rm={rms.helpfulness}", f"safety_rm={rms.safety}", f"out_dir={run_dir}",
                 f"max_prompts={prompts}", "base_recipe=null"]
    full = demo.load(RejectionRecipe, "rejection.yaml", overrides)
    # the fixed work shrinks too: the temperature sweep's prompts, the held-out prompts answered each iteration
    f = demo.fraction("rejection", FLOOR_S, FULL_S)
    overrides += [f"sweep.prompts={sized(full.sweep.prompts, 2, f)}",
                  f"prompts.held_out={sized(full.prompts.held_out, 6, f)}"]
    recipe = demo.load(RejectionRecipe, "rejection.yaml", overrides)
    t0 = time.time()
    result = rejection_sampling(recipe, quiet=True)
    seconds = time.time() - t0
    records = {r["iteration"]: r for r in result.records}
    k = recipe.samples_per_prompt
    rows = []
    for i, r in sorted(records.items()):
        by_k = r.get("reward_by_k", {})
        rows.append([f"V{i}" + (" (the SFT model)" if i == 0 else ""), r.get("temperature", "-"),
                     by_k.get("1", "-"), by_k.get(str(k), "-"), r["heldout_reward"], r["helpfulness"], r["safety"]])
    last = max(records)
    demo.results.update({"rs_heldout_before": records[0]["heldout_reward"],
                         "rs_heldout_after": records[last]["heldout_reward"], "rs_policy": str(result.policy)})
    section.text(
        f"Rejection-sampling fine-tuning (`llama2.stages.rejection`, `{demo.recipe_name('rejection.yaml')}`) from the "
        f"SFT model, {recipe.iterations} iterations on the first {prompts} training prompts (the stage's time "
        f"decides how many) in {seconds:.0f} s: at each iteration the temperature is re-tuned by a sweep over "
        f"{recipe.sweep.temperatures} on {recipe.sweep.prompts} held-out prompts, the policy draws K = {k} answers "
        "per prompt, the combined reward R_c of the two reward models above picks the best (the safety RM's score "
        f"for a safety prompt or when it falls below {recipe.threshold}, else the helpfulness RM's), and the SFT "
        "stage fine-tunes the policy on the best answers, pooled over the iterations so far.")
    section.table(["policy", "temperature", "samples' mean R_c (K = 1)", f"best-of-{k} R_c", "held-out R_c (greedy)",
                   "held-out R_h", "held-out R_s"], rows,
                  caption=f"Rewards are the RMs' sigmoid probabilities; held-out: greedy answers to "
                          f"{recipe.prompts.held_out} held-out prompts never trained on")
    copy_figure(section, run_dir / "reward_by_k.png", demo.out, "rejection",
                "Mean best-of-K and median reward against K for each iteration (the paper's Figure 7), on nested "
                "subsets of the same samples")
    if demo.gold is not None:
        rejection_gold(demo, section, sft, rms, run_dir, records, recipe)
    if demo.world == "world":
        return Done(f"rejection sampling: {recipe.iterations} iterations on {prompts} prompts in {seconds:.0f} s, "
                    f"held-out R_c {records[0]['heldout_reward']:.3f} -> {records[last]['heldout_reward']:.3f}, gold "
                    f"{demo.results['gold']['rejection']['accuracy'][0]:.1%} -> "
                    f"{demo.results['gold']['rejection']['accuracy'][-1]:.1%}, gold score "
                    f"{demo.results['gold']['rejection']['score'][0]:.1f} -> "
                    f"{demo.results['gold']['rejection']['score'][-1]:.1f} "
                    f"({demo.results['gold']['rejection']['change']['score_points']:+.1f})"
                    + "; on the SFT model's samples " + ranking_text(demo.results["gold"]["rejection"]["best_of_k"]),
                    Policy(result.policy, "rejection"))
    before = json.loads((run_dir / "heldout_answers.json").read_text())
    after = json.loads((run_dir / f"iter-{last}" / "heldout_answers.json").read_text())
    _, val = builtin_prompts(quiet=True)
    held = val[:len(before)][:6]
    scorer = CombinedReward(RewardModel.load(rms.helpfulness), RewardModel.load(rms.safety))
    safety = [p.safety for p in held]
    r_before = scorer([p.messages for p in held], before[:len(held)], safety).combined
    r_after = scorer([p.messages for p in held], after[:len(held)], safety).combined
    section.samples([("(safety) " if p.safety else "") + p.text for p in held],
                    {"SFT model": before[:len(held)], f"after V{last}": after[:len(held)]},
                    notes={"SFT model": [f"R_c {x:.2f}" for x in r_before],
                           f"after V{last}": [f"R_c {x:.2f}" for x in r_after]},
                    caption="Held-out prompts: greedy answers and their combined reward")
    return Done(f"rejection sampling: {recipe.iterations} iterations on {prompts} prompts in {seconds:.0f} s, "
                f"held-out R_c {records[0]['heldout_reward']:.3f} -> {records[last]['heldout_reward']:.3f}",
                Policy(result.policy, "rejection"))
