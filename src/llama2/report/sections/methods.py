"""Methods compared (beyond the paper): from one SFT model, with the same time each, rejection sampling, PPO, DPO
and GRPO (on the two reward models, and on the world's gold judge as a verifiable reward), every result measured
against gold on the same held-out questions: gold accuracy and gold score and their paired changes from SFT, the
reward the RMs give the answers, the KL to the SFT model, safety violations and false refusals, answers sampled and
seconds spent.
With several seeds each method runs once per seed and its row holds the means, the change's interval over the seeds
(Student's t) instead of over the questions."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...checkpoint import load_checkpoint
from ...eval.compare import sampled_kl
from ...eval.gold import pick, safety_rates, seed_interval
from ...figures import pyplot, save_png
from ...reward import CombinedReward, RewardModel
from ...stages import dpo, grpo, ppo
from ...stages.rejection import RejectionRecipe, rejection_sampling
from ...tokenizer import Tokenizer
from ...train.distributed import shutdown
from ..budget import fit_within
from ..report import Section
from .artifacts import ChatModel, RewardModels
from .common import Demo, Done, need, say
from .gold import effect, helpful_accuracy, helpful_score, run_results

METHODS = ("rejection", "ppo", "dpo", "grpo-rm", "grpo-gold")
LABELS = {"rejection": "rejection sampling (2 iterations)", "ppo": "PPO (RMs)", "dpo": "DPO (comparisons)",
          "grpo-rm": "GRPO (RMs)", "grpo-gold": "GRPO (gold judge)"}
CAP = 400  # steps at most for a training method (its time slice usually decides)
KL_PER_FAMILY = 10  # held-out helpfulness questions per family the KL to the SFT model is estimated on
MEASURE_S = 12.0  # seconds per method for its measurements (gold answers, R_c, the KL), kept out of its slice
RS_FIXED_S, RS_PER_PROMPT_S = 15.0, 0.2  # rejection sampling's seconds: sweeps and start-up, and per training
#   prompt (8 answers, scored, both iterations, fine-tuning included), measured on 2 idle cores: 256 prompts, 53 s
RS_MAX_PROMPTS = 2048


@dataclass
class Outcome:
    checkpoint: Path
    seconds: float
    samples: int  # answers the method generated (0 for DPO, which reads comparisons)
    steps: int


def run(demo: Demo, section: Section, chat: ChatModel | None, rms: RewardModels | None,
        methods: tuple[str, ...] = METHODS, seeds: int = 1) -> Done[None]:
    """Every method of `methods`, each with seeds demo.seed, demo.seed + 1, ... (`seeds` of them)."""
    sft, rms = need(chat, "the comparison needs the SFT model").checkpoint, need(rms, "the comparison needs the RMs")
    bench = need(demo.gold, "the comparison measures against gold: it runs in the built-in world")
    runners: dict[str, Callable[[float, Path, int], Outcome]] = {
        "rejection": lambda end, d, seed: _rejection(demo, sft, rms, end, d, seed),
        "ppo": lambda end, d, seed: _ppo(demo, sft, rms, end, d, seed),
        "dpo": lambda end, d, seed: _dpo(demo, sft, end, d, seed),
        "grpo-rm": lambda end, d, seed: _grpo(demo, sft, rms, "rm", end, d, seed),
        "grpo-gold": lambda end, d, seed: _grpo(demo, sft, rms, "gold", end, d, seed)}
    seed_list = [demo.seed + i for i in range(seeds)]
    scorer = CombinedReward(RewardModel.load(rms.helpfulness), RewardModel.load(rms.safety))
    kl_prompts = [i.messages for i in pick(bench.helpful(), KL_PER_FAMILY, seed=demo.seed)]
    sft_model = load_checkpoint(sft).eval()
    tok = Tokenizer(sft)
    base = bench.measure(sft)
    rows: dict[str, dict[str, Any]] = {"SFT (the start)": _measures(base, base, scorer, 0.0)}
    deadline = demo.budget.deadline("methods")
    runs_left = len(methods) * seeds
    for name in methods:
        runs = []
        for seed in seed_list:
            share = (deadline - time.time()) / runs_left
            runs_left -= 1
            end = time.time() + max(share - MEASURE_S * demo.budget.pace, 10.0)
            done = runners[name](end, demo.run_dir(f"methods-{name}" + (f"-seed{seed}" if seeds > 1 else "")), seed)
            after = bench.measure(done.checkpoint)
            kl = sampled_kl(load_checkpoint(done.checkpoint).eval(), sft_model, tok, kl_prompts, seed=seed)
            runs.append({**_measures(base, after, scorer, kl), "seed": seed, "samples": done.samples,
                         "steps": done.steps, "seconds": round(done.seconds, 1), "checkpoint": str(done.checkpoint)})
            say(f"   {LABELS[name]}" + (f" (seed {seed})" if seeds > 1 else "")
                + f": gold {runs[-1]['change']['points']:+.1f} points in {done.seconds:.0f} s")
        rows[LABELS[name]] = runs[0] if seeds == 1 else _over_seeds(runs)
    section.text(
        "From the same SFT model and reward models, each method trains for the same share of the time (its length "
        "re-planned as it runs to end on time) with its recipe in `configs/world/`: rejection sampling (best of "
        "8 by the RMs' R_c, two iterations, as many prompts as the time allows), PPO (the recipe's beta), DPO (the "
        "comparisons the RMs were trained on, no sampling), GRPO with LOGIT(R_c) as the reward, and GRPO with the "
        "gold judge's score as the reward (a verifiable reward: an upper bound on what a perfect RM would give). "
        "Each model then answers the same held-out questions greedily; the change is a paired difference on them"
        + (f", and each method ran with {seeds} seeds ({', '.join(map(str, seed_list))}): its row holds the means, "
           "and the change's interval is over the seeds (Student's t), not over the questions. " if seeds > 1 else
           ". ")
        + f"The KL to SFT is estimated on one sampled answer to each of {len(kl_prompts)} held-out questions.")
    _write(demo, section, rows, seeds)
    figure = _figure(rows, demo.out / "figures" / "methods" / "methods.png")
    section.figure(figure, "Each method's change in held-out gold accuracy and gold score from the SFT model (95% "
                           "intervals, "
                           + ("over the seeds" if seeds > 1 else "paired over the questions")
                           + "), and gold against the reward the RMs give the same answers")
    best = max((k for k in rows if k != "SFT (the start)"), key=lambda k: rows[k]["change"]["points"])
    return Done(f"methods: best {best} {rows[best]['change']['points']:+.1f} gold points "
                f"[{rows[best]['change']['ci95'][0]:+.1f}, {rows[best]['change']['ci95'][1]:+.1f}]", None)


def _over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's row from its runs with different seeds: the means, and the change's 95% interval over the
    seeds (each run's own paired change is its value); the runs themselves under "seeds"."""
    def mean(key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    points, lo, hi = seed_interval([r["change"]["points"] for r in runs])
    s_points, s_lo, s_hi = seed_interval([r["change"]["score_points"] for r in runs])
    return {"accuracy": round(mean("accuracy"), 4), "score": round(mean("score"), 2),
            "change": {"points": round(points, 1), "ci95": [round(lo, 1), round(hi, 1)],
                       "score_points": round(s_points, 1), "score_ci95": [round(s_lo, 1), round(s_hi, 1)],
                       "over": "seeds"},
            "reward": round(mean("reward"), 4), "kl": round(mean("kl"), 3), "violations": round(mean("violations"), 4),
            "false_refusals": round(mean("false_refusals"), 4), "samples": round(mean("samples")),
            "steps": round(mean("steps")), "seconds": round(sum(r["seconds"] for r in runs), 1), "seeds": runs}


def _measures(base: Any, after: Any, scorer: CombinedReward, kl: float) -> dict[str, Any]:
    """Gold accuracy and gold score and their paired changes from SFT, R_c of the held-out answers, the KL, safety
    rates."""
    items = after.items
    r_c = scorer([i.messages for i in items], after.answers, [i.safety for i in items]).combined
    rates = safety_rates(after)
    return {"accuracy": round(helpful_accuracy(after), 4), "score": round(helpful_score(after), 2),
            "change": effect(base, after),
            "reward": round(sum(r_c) / len(r_c), 4), "kl": round(kl, 3),
            "violations": rates["violations"]["rate"], "false_refusals": rates["false_refusals"]["rate"],
            "gold": run_results(after)}


def _write(demo: Demo, section: Section, rows: dict[str, dict[str, Any]], seeds: int = 1) -> None:
    """The table and results.json's part."""
    table = []
    for label, r in rows.items():
        change, start = r["change"], label.startswith("SFT")
        table.append([label, f"{100 * r['accuracy']:.1f}",
                      "-" if start else f"{change['points']:+.1f} [{change['ci95'][0]:+.1f}, {change['ci95'][1]:+.1f}]",
                      f"{r['score']:.1f}",
                      "-" if start else
                      f"{change['score_points']:+.1f} [{change['score_ci95'][0]:+.1f}, {change['score_ci95'][1]:+.1f}]",
                      f"{r['reward']:.3f}", f"{r['kl']:.2f}", f"{100 * r['violations']:.0f}",
                      f"{100 * r['false_refusals']:.0f}", r.get("samples", "-"), r.get("steps", "-"),
                      r.get("seconds", "-")])
    section.table(["method", "gold accuracy (%)", "change (points, 95%)", "gold score", "change (points, 95%)",
                   "R_c of the answers", "KL to SFT", "violations (%)", "false refusals (%)", "answers sampled",
                   "steps", "seconds"], table, caption="Every method from the same SFT model with the same time, "
                                                      "measured on the same held-out world questions"
                                                      + (f"; means over {seeds} seeds, intervals over the seeds, "
                                                         "seconds summed" if seeds > 1 else ""))
    demo.results.setdefault("gold", {})["methods"] = rows


def _figure(rows: dict[str, dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    methods = [k for k in rows if not k.startswith("SFT")]
    ys = list(range(len(methods)))
    for key, interval, label, color, shift in (("points", "ci95", "accuracy", "tab:blue", -0.12),
                                                ("score_points", "score_ci95", "gold score", "tab:orange", 0.12)):
        points = [rows[k]["change"][key] for k in methods]
        lows = [p - rows[k]["change"][interval][0] for p, k in zip(points, methods)]
        highs = [rows[k]["change"][interval][1] - p for p, k in zip(points, methods)]
        ax.errorbar(points, [y + shift for y in ys], xerr=[lows, highs], fmt="o", color=color, capsize=4,
                    label=label)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(ys, methods)
    ax.invert_yaxis()
    ax.set(xlabel="change from SFT on held-out questions (points)", title="gold")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3, axis="x")
    for k in rows:
        bx.scatter(rows[k]["reward"], 100 * rows[k]["accuracy"], s=30)
        bx.annotate(k, (rows[k]["reward"], 100 * rows[k]["accuracy"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    bx.set(xlabel="mean R_c the RMs give the held-out answers", ylabel="held-out gold accuracy (%)",
           title="what the RMs reward against what is true")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# The methods, each until its end time


def _fit(demo: Demo, make: Callable[[], Any], start: Callable[[Any], None], end: float, desc: str
         ) -> tuple[Path, int, float]:
    """Build a stage's run (`make`), start it (`start`: its evaluate_at_start) and train it until `end`:
    (checkpoint, steps, seconds)."""
    t0 = time.time()
    try:
        run = make()
        start(run)
        result, _ = fit_within(run.trainer, end, cap=CAP, min_steps=2, quiet=demo.quiet, desc=desc, evals=1,
                               choose_threads=False)
    finally:
        shutdown()
    return result.checkpoint, result.step, time.time() - t0


def _common(sft: Path, out: Path, seed: int, rms: RewardModels | None = None) -> list[str]:
    """The overrides every method's recipe gets: the start, the run directory, the seed, one checkpoint at the
    end."""
    models = [f"helpfulness_rm={rms.helpfulness}", f"safety_rm={rms.safety}"] if rms is not None else []
    return [f"base={sft}", "base_recipe=null", f"out_dir={out}", f"seed={seed}", *models]


def _ppo(demo: Demo, sft: Path, rms: RewardModels, end: float, out: Path, seed: int) -> Outcome:
    recipe = demo.load(ppo.PPORecipe, "ppo.yaml", [*_common(sft, out, seed, rms), "save_every=0", "keep_last=1",
                                                   "prompts.held_out=8"])
    checkpoint, steps, seconds = _fit(demo, lambda: ppo.PPO(recipe, quiet=True), ppo.evaluate_at_start, end, "ppo")
    return Outcome(checkpoint, seconds, steps * recipe.batch_size, steps)


def _grpo(demo: Demo, sft: Path, rms: RewardModels, reward: str, end: float, out: Path, seed: int) -> Outcome:
    recipe = demo.load(grpo.GRPORecipe, "grpo.yaml", [*_common(sft, out, seed, rms), f"reward={reward}", "save_every=0",
                                                      "keep_last=1", "prompts.held_out=8"])
    checkpoint, steps, seconds = _fit(demo, lambda: grpo.GRPO(recipe, quiet=True), grpo.evaluate_at_start, end,
                                      f"grpo ({reward})")
    return Outcome(checkpoint, seconds, steps * recipe.batch_size * recipe.group_size, steps)


def _dpo(demo: Demo, sft: Path, end: float, out: Path, seed: int) -> Outcome:
    recipe = demo.load(dpo.DPORecipe, "dpo.yaml", [*_common(sft, out, seed), "save_every=0", "keep_last=1",
                                                   "max_steps=null", "epochs=1"])
    checkpoint, steps, seconds = _fit(demo, lambda: dpo.DPO(recipe, quiet=True), dpo.evaluate_at_start, end, "dpo")
    return Outcome(checkpoint, seconds, 0, steps)


def _rejection(demo: Demo, sft: Path, rms: RewardModels, end: float, out: Path, seed: int) -> Outcome:
    t0 = time.time()
    pace = demo.budget.pace
    prompts = int(min(RS_MAX_PROMPTS, max(8, (end - t0 - RS_FIXED_S * pace) / (RS_PER_PROMPT_S * pace))))
    recipe = demo.load(RejectionRecipe, "rejection.yaml", [*_common(sft, out, seed, rms), f"max_prompts={prompts}",
                                                           "prompts.held_out=8"])
    result = rejection_sampling(recipe, quiet=True)
    k, iterations = recipe.samples_per_prompt, recipe.iterations
    return Outcome(Path(result.policy), time.time() - t0, prompts * k * iterations, iterations)
