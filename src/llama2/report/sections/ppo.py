"""7. PPO from the rejection-sampling policy with the demo's RMs, as many iterations as the section's time
allows: reward and KL curves, the first and last iterations' numbers, held-out reward before and after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...checkpoint.runs import list_checkpoints
from ...errors import Llama2Error
from ...figures import pyplot, save_png
from ...stages.ppo import PPO, PPORecipe, evaluate_at_start, reward_curves
from ...train.distributed import shutdown
from ..budget import fit_within
from ..report import Section
from .artifacts import Policy, RewardModels
from .common import (
    Demo,
    Done,
    copy_figure,
    need,
    plan_steps,
    run_metrics,
    sized,
)
from .gold import effect, gold_table, helpful_accuracy, run_results

CAP = 40  # iterations at most (the budget usually decides)
GOLD_EVERY = 10  # PPO keeps a checkpoint every this many iterations, each measured against gold afterwards
FLOOR_S, FULL_S = 4.0, 7.0  # seconds for 2 iterations at the smallest (8 prompts) and full size, 2 idle cores


def run(demo: Demo, section: Section, start: Policy | None, rms: RewardModels | None) -> Done[Policy]:
    message = "PPO needs the rejection-sampling policy and both reward models, and they did not finish"
    policy, rms = need(start, message).checkpoint, need(rms, message)
    run_dir = demo.run_dir("ppo")
    # the tiny recipe's rate moves the tiny policy visibly in a few dozen iterations; beta keeps it near pi_0
    overrides = [f"base={policy}", f"helpfulness_rm={rms.helpfulness}", f"safety_rm={rms.safety}",
                 f"out_dir={run_dir}", "base_recipe=null",
                 *((f"save_every={GOLD_EVERY}", "keep_last=100") if demo.gold is not None else ("save_every=0", "keep_last=1")), f"max_steps={CAP}",
                 "optim.lr=1e-4", "beta=0.02"]
    full = demo.load(PPORecipe, "ppo.yaml", overrides)
    # short of time: fewer prompts per iteration (as many gradient steps each) and fewer held-out prompts
    f = demo.fraction("ppo", FLOOR_S, FULL_S)
    batch = sized(full.batch_size, 8, f)
    overrides += [f"batch_size={batch}", f"mini_batch={max(1, full.mini_batch * batch // full.batch_size)}",
                  f"prompts.held_out={sized(full.prompts.held_out, 6, f)}"]
    recipe = demo.load(PPORecipe, "ppo.yaml", overrides)
    try:
        ppo_run = PPO(recipe, quiet=True)
        evaluate_at_start(ppo_run)
        result, plan = fit_within(ppo_run.trainer, demo.budget.deadline("ppo"), cap=CAP, min_steps=2,
                                  quiet=demo.quiet, desc="ppo", evals=2, choose_threads=False)
    finally:
        shutdown()
    if result.checkpoint is None:
        raise Llama2Error("the demo's PPO saved no checkpoint")
    records = run_metrics(run_dir)
    reward_curves(records, run_dir / "rewards.png")
    rows = [r for r in records if "reward" in r]
    held = [r for r in records if "heldout_reward" in r]
    n = max(1, min(3, len(rows) // 2))

    def mean(key: str, part: list[dict[str, Any]]) -> float:
        return sum(r[key] for r in part) / len(part)

    first, last = rows[:n], rows[-n:]
    table = [[label, mean("reward", part), mean("reward_helpfulness", part), mean("reward_safety", part),
              mean("kl", part), mean("response_length", part), mean("truncated", part)]
             for label, part in ((f"first {n} iteration(s)", first), (f"last {n} iteration(s)", last))]
    demo.results.update({"ppo_policy": str(result.checkpoint), "ppo_iterations": result.step,
                         "ppo_reward_first": table[0][1], "ppo_reward_last": table[1][1], "ppo_kl_last": table[1][4],
                         "ppo_heldout_before": held[0]["heldout_reward"] if held else None,
                         "ppo_heldout_after": held[-1]["heldout_reward"] if held else None})
    section.text(
        f"PPO (`llama2.stages.ppo`, `{demo.recipe_name('ppo.yaml')}`) from the rejection-sampling policy V2, {result.step} "
        f"iterations of {recipe.batch_size} prompts ({plan_steps(plan)}): answers sampled "
        "through the generation path, scored by WHITEN(LOGIT(R_c)) of the two reward models with a per-token KL "
        f"penalty (beta {recipe.beta}) to the frozen starting policy, a penalty of {recipe.truncation_penalty} for "
        "answers cut at the length limit, GAE, the clipped policy and value losses (the value model starts from the "
        f"helpfulness RM), {recipe.batch_size // recipe.mini_batch} gradient steps per iteration.")
    section.table(["iterations", "rollout R_c", "R_h", "R_s", "KL to pi_0", "answer tokens", "cut at the limit"],
                  table, caption="Means over the rollouts of the first and last iterations")
    if held:
        section.text(f"Held-out greedy R_c on {recipe.prompts.held_out} prompts never trained on: "
                     f"{held[0]['heldout_reward']:.3f} before PPO, {held[-1]['heldout_reward']:.3f} after "
                     f"iteration {held[-1]['step']}.")
    copy_figure(section, run_dir / "rewards.png", demo.out, "ppo", "PPO: mean rollout rewards (R_c, R_h, R_s), "
                "held-out R_c, and the KL to the starting policy, per iteration")
    gold_text = ""
    if demo.gold is not None:
        curve = ppo_gold(demo, section, policy, run_dir, records)
        gold_text = f", gold {curve['accuracy'][0]:.1%} -> {curve['accuracy'][-1]:.1%}"
    return Done(f"ppo: {result.step} iterations, rollout R_c {table[0][1]:.3f} -> {table[1][1]:.3f}, KL to pi_0 "
                f"{table[1][4]:.2f}{gold_text}", Policy(result.checkpoint, "ppo"))


def ppo_gold(demo: Demo, section: Section, start: Path, run_dir: Path, records: list[dict[str, Any]]
             ) -> dict[str, Any]:
    """Gold accuracy of the starting policy and of every checkpoint PPO kept, beside the rollout reward at those
    iterations: over-optimisation shows as reward up, gold down."""
    bench = demo.gold
    points = [(0, bench.measure(start))] + [(step, bench.measure(path)) for step, path in list_checkpoints(run_dir)]
    rewards = {r["step"]: r["reward"] for r in records if "reward" in r}
    steps = [s for s, _ in points]
    curve = {"step": steps, "accuracy": [round(helpful_accuracy(r), 4) for _, r in points],
             "reward": [rewards.get(s, rewards.get(min(rewards, key=lambda k: abs(k - s)), None)) if rewards else None
                        for s in steps]}
    change = effect(points[0][1], points[-1][1])
    demo.results.setdefault("gold", {})["ppo"] = {"curve": curve, "change": change,
                                                 "before": run_results(points[0][1]),
                                                 "after": run_results(points[-1][1])}
    gold_table(section, {"start (V2)": points[0][1], f"after {steps[-1]} iterations": points[-1][1]},
               f"**Gold** on held-out world questions, before and after PPO: {change['points']:+.1f} points (95% "
               f"interval {change['ci95'][0]:+.1f} to {change['ci95'][1]:+.1f}, paired)")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, [100 * a for a in curve["accuracy"]], "o-", color="tab:blue", label="gold accuracy (held out)")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("gold accuracy (%)")
    ax.set_ylim(0, 100)
    lines = ax.get_lines()
    if rewards:
        ax2 = ax.twinx()
        xs = sorted(rewards)
        ax2.plot(xs, [rewards[x] for x in xs], "-", color="tab:red", alpha=0.7, label="rollout R_c")
        ax2.set_ylabel("rollout R_c", color="tab:red")
        lines = lines + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower left", fontsize=8, framealpha=0.9)
    path = demo.out / "figures" / "ppo" / "gold.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    section.figure(save_png(fig, path), "PPO against gold: held-out gold accuracy of the checkpoints PPO kept, and "
                                        "the rollout reward the policy was optimised for")
    return curve
