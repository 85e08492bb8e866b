"""6. Rejection sampling: two iterations of rejection-sampling fine-tuning from the SFT model with the demo's two
RMs, on as many built-in prompts as the section's time allows; the best-of-K curves (Figure 7) and held-out
rewards per iteration, held-out answers before and after."""

from __future__ import annotations

import json
import time

from ...data.prompts import builtin_prompts
from ...recipe import load_recipe
from ...reward import CombinedReward, RewardModel
from ...stages.rejection import RejectionRecipe, rejection_sampling
from ..report import Section
from .artifacts import ChatModel, Policy, RewardModels
from .common import CONFIGS, Demo, Done, copy_figure, need, sized

RECIPE = CONFIGS / "rejection.yaml"
SECONDS_PER_PROMPT = 0.8  # measured: both iterations, sweep and fine-tuning included, per training prompt
FLOOR_S, FULL_S = 8.0, 10.0  # seconds on 8 prompts at the smallest (sweep 2, held out 6) and full size, 2 idle cores


def run(demo: Demo, section: Section, chat: ChatModel | None, rms: RewardModels | None) -> Done[Policy]:
    message = "rejection sampling needs the SFT model and both reward models, and they did not finish"
    sft, rms = need(chat, message).checkpoint, need(rms, message)
    run_dir = demo.run_dir("rejection")
    left = demo.budget.left("rejection")
    prompts = int(min(128, max(8, left / SECONDS_PER_PROMPT)))
    overrides = [f"base={sft}", f"helpfulness_rm={rms.helpfulness}", f"safety_rm={rms.safety}", f"out_dir={run_dir}",
                 f"max_prompts={prompts}", "base_recipe=null"]
    full = load_recipe(RejectionRecipe, RECIPE, overrides)
    # the fixed work shrinks too: the temperature sweep's prompts, the held-out prompts answered each iteration
    f = demo.fraction("rejection", FLOOR_S, FULL_S)
    overrides += [f"sweep.prompts={sized(full.sweep.prompts, 2, f)}",
                  f"prompts.held_out={sized(full.prompts.held_out, 6, f)}"]
    recipe = load_recipe(RejectionRecipe, RECIPE, overrides)
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
        f"Rejection-sampling fine-tuning (`llama2.stages.rejection`, `configs/tiny/rejection.yaml`) from the SFT "
        f"model, {recipe.iterations} iterations on the first {prompts} built-in training prompts (the stage's time "
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
