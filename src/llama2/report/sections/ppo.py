"""7. PPO with the demo's RMs, as many iterations as the section's time allows, from the rejection-sampling
policy (as the paper applies it on top of rejection sampling) or, in the built-in world, from the SFT model beside
rejection sampling (the two algorithms from one start, each measured against gold): reward and KL curves, the first
and last iterations' numbers, held-out reward before and after."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ...checkpoint.runs import list_checkpoints
from ...errors import Llama2Error
from ...eval.gold import safety_rates
from ...figures import pyplot, save_png
from ...stages.ppo import PPO, PPORecipe, evaluate_at_start, reward_curves
from ...train.distributed import shutdown
from ...train.loop import TrainResult
from ..budget import FitPlan, fit_within
from ..report import Section
from .artifacts import ChatModel, Policy, RewardModels
from .common import (
    Demo,
    Done,
    copy_figure,
    need,
    plan_steps,
    run_metrics,
    sized,
)
from .gold import effect, effect_text, gold_table, helpful_accuracy, helpful_score, run_results

CAP = 40  # iterations at most (the budget usually decides)
MAIN_SHARE = 0.6  # of the section's time for the recipe's run when a small-beta run follows (the world)
SMALL_BETA = 0.001  # the over-optimisation run's KL coefficient ...
# ... and its rate, 10x the world recipe's: at the recipe's rate a small beta needs ~80 iterations to drift (gold score
# 73.5 -> 71.0, harmful requests refused 88% -> 42%), more than the demo has. From a seed-0 demo's SFT model (gold
# accuracy 63.1%, score 60.3), 12 iterations at 3e-4: beta 0.001 took the held-out R_c 0.49 -> 0.81 while accuracy
# fell to 31.7% and score to 51.7, every harmful request answered; beta 0.3 at the same rate lost less (50.6%, 65.3)
SMALL_BETA_LR = 3e-4
GOLD_EVERY = 10  # PPO keeps a checkpoint every this many iterations, each measured against gold afterwards
FLOOR_S, FULL_S = 4.0, 7.0  # seconds for 2 iterations at the smallest (8 prompts) and full size, 2 idle cores
# In the world: two runs (the recipe's beta and a small one) of about 10 iterations each, the concise form found in
# the first 10 (gold score +14 in a seed-1 demo), and each kept checkpoint measured against gold; a slow hour that
# left PPO its 2-iteration floor left it nothing to show (a seed-0 demo at pace 3.35: gold score -0.5)
WORLD_FLOOR_S = 22.0


def run(demo: Demo, section: Section, start: Policy | ChatModel | None, rms: RewardModels | None) -> Done[Policy]:
    message = "PPO needs a policy to start from and both reward models, and they did not finish"
    policy, rms = need(start, message).checkpoint, need(rms, message)
    start_name = ("the SFT model, beside rejection sampling (both of the paper's RLHF algorithms from one start, each "
                  "against gold; on top of rejection sampling, which already finds the concise form, PPO has little "
                  "left to gain in this world)" if isinstance(start, ChatModel) else "the rejection-sampling policy V2")
    run_dir = demo.run_dir("ppo")
    # the tiny recipe's rate moves the tiny policy visibly in a few dozen iterations; beta keeps it near pi_0
    overrides = [f"base={policy}", f"helpfulness_rm={rms.helpfulness}", f"safety_rm={rms.safety}",
                 f"out_dir={run_dir}", "base_recipe=null",
                 f"max_steps={CAP}",
                 *((f"save_every={GOLD_EVERY}", "keep_last=100") if demo.gold is not None else
                   ("save_every=0", "keep_last=1")),
                 *(() if demo.world == "world" else ("optim.lr=1e-4", "beta=0.02"))]  # the world: its recipe's
    full = demo.load(PPORecipe, "ppo.yaml", overrides)
    # short of time: fewer prompts per iteration (as many gradient steps each) and fewer held-out prompts
    f = demo.fraction("ppo", FLOOR_S, FULL_S)
    batch = sized(full.batch_size, 8, f)
    overrides += [f"batch_size={batch}", f"mini_batch={max(1, full.mini_batch * batch // full.batch_size)}",
                  f"prompts.held_out={sized(full.prompts.held_out, 6, f)}"]
    recipe = demo.load(PPORecipe, "ppo.yaml", overrides)
    deadline = demo.budget.deadline("ppo")
    # in the world, a second run with a small beta shares the time: what the RMs allow without the KL penalty
    own_end = time.time() + (deadline - time.time()) * (MAIN_SHARE if demo.gold is not None else 1.0)
    result, plan = train(demo, recipe, own_end, "ppo")
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
        f"PPO (`llama2.stages.ppo`, `{demo.recipe_name('ppo.yaml')}`) from {start_name}, {result.step} "
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
        small_dir = demo.run_dir("ppo-small-beta")
        small = demo.load(PPORecipe, "ppo.yaml", [*overrides, f"out_dir={small_dir}", f"beta={SMALL_BETA}",
                                                   f"optim.lr={SMALL_BETA_LR}"])
        train(demo, small, deadline, f"ppo beta {SMALL_BETA}")
        runs = {f"beta {recipe.beta}, lr {recipe.optim.lr:g} (the recipe's)": (run_dir, records),
                f"beta {SMALL_BETA}, lr {SMALL_BETA_LR:g}": (small_dir, run_metrics(small_dir))}
        faster = SMALL_BETA_LR / recipe.optim.lr
        section.text(f"Beside it, the same run with a small beta ({SMALL_BETA}) and a {faster:g}x rate: nearly free "
                     "of the KL penalty, it shows within the demo's few iterations what the reward models allow "
                     "when nothing holds the policy near its start (at the recipe's rate the same drift takes about "
                     "80 iterations; docs/ppo.md).")
        curves = ppo_gold(demo, section, policy, runs)
        main, loose = curves.values()
        gold_text = (f", gold {main['accuracy'][0]:.1%} -> {main['accuracy'][-1]:.1%}, gold score "
                     f"{main['score'][0]:.1f} -> {main['score'][-1]:.1f}; beta {SMALL_BETA}: rollout R_c "
                     f"{loose['rollout_reward'][0]:.3f} -> {loose['rollout_reward'][-1]:.3f}, gold "
                     f"{loose['accuracy'][0]:.1%} -> {loose['accuracy'][-1]:.1%}, score {loose['score'][0]:.1f} -> "
                     f"{loose['score'][-1]:.1f}")
    return Done(f"ppo: {result.step} iterations, rollout R_c {table[0][1]:.3f} -> {table[1][1]:.3f}, KL to pi_0 "
                f"{table[1][4]:.2f}{gold_text}", Policy(result.checkpoint, "ppo"))


def train(demo: Demo, recipe: PPORecipe, deadline: float, desc: str) -> tuple[TrainResult, FitPlan]:
    """One PPO run until `deadline` (its held-out reward measured before the first iteration)."""
    try:
        ppo_run = PPO(recipe, quiet=True)
        evaluate_at_start(ppo_run)
        return fit_within(ppo_run.trainer, deadline, cap=CAP, min_steps=2, quiet=demo.quiet, desc=desc, evals=2,
                          choose_threads=False)
    finally:
        shutdown()


def ppo_gold(demo: Demo, section: Section, start: Path, runs: dict[str, tuple[Path, list[dict[str, Any]]]]
             ) -> dict[str, dict[str, Any]]:
    """Gold accuracy of the starting policy and of every checkpoint each PPO run kept, beside its rollout reward:
    over-optimisation shows as reward up, gold down."""
    bench = demo.gold
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.6))
    curves, finals = {}, {}
    for (label, (run_dir, records)), colour in zip(runs.items(), ("tab:blue", "tab:orange")):
        points = [(0, bench.measure(start))] + [(step, bench.measure(path))
                                                for step, path in list_checkpoints(run_dir)]
        rewards = {r["step"]: r["reward"] for r in records if "reward" in r}
        steps = [step for step, _ in points]
        change = effect(points[0][1], points[-1][1])
        curves[label] = {"step": steps, "accuracy": [round(helpful_accuracy(r), 4) for _, r in points],
                         "score": [round(helpful_score(r), 2) for _, r in points],
                         # where the RMs are blind, a PPO run that strays shows it first: harmful requests answered
                         "violations": [safety_rates(r)["violations"]["rate"] for _, r in points],
                         "rollout_reward": [rewards.get(k) for k in sorted(rewards)],
                         "rollout_steps": sorted(rewards), "change": change,
                         "after": run_results(points[-1][1])}
        finals[f"{label}, after {steps[-1]} iterations"] = points[-1][1]
        ax.plot(steps, [100 * a for a in curves[label]["accuracy"]], "o-", color=colour, label=f"{label}: accuracy")
        ax.plot(steps, curves[label]["score"], "s--", color=colour, label=f"{label}: gold score")
        ax.plot(steps, [100 * v for v in curves[label]["violations"]], "^:", color=colour,
                label=f"{label}: violations (%)")
        ax2.plot(sorted(rewards), [rewards[k] for k in sorted(rewards)], "-", color=colour, label=label)
    ax.set(xlabel="PPO iteration", ylabel="held-out gold: accuracy, violations (%), score", title="gold",
           ylim=(0, 100))
    ax2.set(xlabel="PPO iteration", ylabel="rollout R_c", title="what PPO optimises: the RMs' reward")
    for a in (ax, ax2):
        a.legend(fontsize=8, loc="lower left", framealpha=0.9)
    path = demo.out / "figures" / "ppo" / "gold.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    section.figure(save_png(fig, path), "PPO against gold, at the recipe's beta and at a small beta: held-out gold "
                                        "accuracy, gold score and violations (harmful requests answered) of the "
                                        "checkpoints each run kept (left) beside the "
                                        "rollout reward it was optimised for (right); over-optimisation is reward "
                                        "up, gold down")
    first = next(iter(curves.values()))
    demo.results.setdefault("gold", {})["ppo"] = {"runs": curves, "before": run_results(bench.measure(start))}
    gold_table(section, {"start": bench.measure(start), **finals},
               "Gold on held-out world questions, before and after PPO; at the recipe's beta: accuracy "
               f"{effect_text(first['change'])} (95% intervals, paired)")
    return curves
