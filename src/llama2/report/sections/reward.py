"""5. Reward models: the helpfulness and safety reward models trained from the SFT model on the built-in
comparisons, each within its part of the section's budget; Table 8 per rating level beside the paper's, before
and after training, the safety RM on harmful requests and benign look-alikes, score histograms."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ...data.comparisons import (
    COMPLIANT_ANSWERS,
    NEEDLESS_REFUSALS,
    RATINGS,
    ensure_comparisons,
    read_comparisons,
)
from ...data.jsonl import read_jsonl
from ...data.world import data_path, read_gold
from ...errors import Llama2Error
from ...eval.gold import reward_model_vs_gold, scores_vs_gold
from ...reward import RewardModel
from ...stages.reward import (
    PAPER_TABLE_8,
    RewardRecipe,
    build_reward,
    evaluate_at_start,
)
from ...train.distributed import shutdown
from ..budget import FitPlan, fit_within
from ..report import Section
from .artifacts import ChatModel, RewardModels
from .common import (
    Demo,
    Done,
    copy_figure,
    need,
    pct,
    plan_steps,
    run_figures,
    run_metrics,
)

RECIPES = {"helpfulness": "reward-helpfulness.yaml", "safety": "reward-safety.yaml"}
# Held-out helpfulness comparisons each RM scores (before and after training) and the gold table judges: the
# held-out file's first 600 (all 1,669 took four times the seconds of the helpfulness RM's training in one demo)
GOLD_PAIRS = 600
AFTER_TRAINING = 0.3  # the section's work after the last RM's final evaluation (gold judge, figures), in evaluations
RM_SHARES = {"helpfulness": 0.7, "safety": 0.3}  # of the section's time: the safety RM learns its set in a few steps
FLOOR_S = 16.0  # seconds at its smallest (a step or two each, the held-out evaluations), 2 idle cores
# In the world the helpfulness RM needs about 100 steps to rank significantly-better pairs as gold does (from one
# seed-0 SFT model, lr 3e-4: 43 steps 75.9%, 100 steps 89.6%), ~50 s at pace 3.3 with its evaluations
WORLD_FLOOR_S = 20.0


def table_8_rows(records: list[dict[str, Any]], kind: str) -> list[list[Any]]:
    """Table 8 rows of one RM's run: each held-out set's accuracy per rating level, before and after training."""
    first = next((r for r in records if r.get("step") == 0 and "val_accuracy" in r), {})
    last = [r for r in records if "val_accuracy" in r][-1]
    sets = sorted({k.split("/")[1] for k in last if k.startswith("val_accuracy/")})
    rows = []
    for name in sets:
        for label, rec in (("before", first), ("after", last)):
            cells = [pct(rec.get(f"val_accuracy/{name}/{r}")) for r in RATINGS]
            rows.append([f"{kind} RM, {name} held-out, {label} training", *cells, pct(rec.get(f"val_accuracy/{name}"))])
    return rows


def safety_examples(rms: RewardModels) -> tuple[list[str], dict[str, list[str]]] | None:
    """Two held-out harmful requests and two benign look-alikes, each RM's probability for the refusal and the
    helpful answer the comparisons hold for them."""
    val = read_comparisons(ensure_comparisons(quiet=True)[1]).comparisons
    picks: list[tuple[Any, str, str]] = []  # (prompt, refusal, helpful)
    for source, n in (("safety:harmful", 2), ("safety:benign", 2)):
        seen = set()
        for c in val:
            text = c.prompt[-1]["content"]
            if c.source != source or text in seen:
                continue
            others = [d for d in val if d.prompt == c.prompt]
            if source == "safety:harmful":  # chosen: the refusal; rejected: compliant or helpful-style
                refusal, helpful = c.chosen, others[-1].rejected
                if helpful in COMPLIANT_ANSWERS:
                    continue  # a request of the fixed table: no helpful-style answer to show
            else:  # chosen: the helpful answer; rejected: a needless refusal or the refusal template
                refusal, helpful = others[-1].rejected, c.chosen
                if refusal in NEEDLESS_REFUSALS:
                    continue
            seen.add(text)
            picks.append((c.prompt, refusal, helpful))
            if len(seen) == n:
                break
    if not picks:
        return None
    cols: dict[str, list[str]] = {}
    for kind, path in (("helpfulness", rms.helpfulness), ("safety", rms.safety)):
        rm = RewardModel.load(path)
        p = [x[0] for x in picks]
        refusal = rm.probs(p, [x[1] for x in picks])
        helpful = rm.probs(p, [x[2] for x in picks])
        cols[f"{kind} RM: refusal / helpful"] = [f"{r:.2f} / {h:.2f}" for r, h in zip(refusal, helpful)]
    cols["refusal"] = [x[1] for x in picks]
    cols["helpful answer"] = [x[2] for x in picks]
    return [("(harmful) " if i < 2 else "(benign) ") + x[0][-1]["content"] for i, x in enumerate(picks)], cols


def saved_scores(checkpoint: Path, name: str, pairs: list[dict[str, Any]]) -> tuple[list[float], list[float]] | None:
    """The RM's scores of `pairs` from its run's last held-out evaluation (heldout_scores.jsonl beside
    checkpoints/, test set `name`) when that evaluation was of this checkpoint and scored exactly these pairs (the
    same count, ratings and sources, in order); None otherwise (then they are scored afresh)."""
    path = checkpoint.parent.parent / "heldout_scores.jsonl"
    if not path.is_file() or not checkpoint.name.removeprefix("step-").isdigit():
        return None
    step = int(checkpoint.name.removeprefix("step-"))
    rows = [r for _, r in read_jsonl(path) if r.get("set") == name]
    if len(rows) != len(pairs) or any(r.get("step") != step or r["rating"] != p["rating"] or r["source"] != p["source"]
                                      for r, p in zip(rows, pairs)):
        return None
    return [r["chosen"] for r in rows], [r["rejected"] for r in rows]


def reward_gold(demo: Demo, section: Section, rms: RewardModels) -> None:
    """Both RMs against the gold judge on the world's held-out comparisons (truth, not the noisy annotator's
    labels), per gold rating level, and how often each prefers a wrong answer to a right one."""
    items = {i.id: i for i in read_gold(data_path("builtin:world/gold.val.jsonl"))}
    pairs = [obj for name in ("comparisons-helpfulness.val.jsonl", "comparisons-safety.val.jsonl")
             for _, obj in read_jsonl(data_path(f"builtin:world/{name}"))]
    help_pairs = [p for p in pairs if not p["safety"]][:GOLD_PAIRS]
    safe_pairs = [p for p in pairs if p["safety"]]
    results, rows = {}, []
    for kind, path in (("helpfulness", rms.helpfulness), ("safety", rms.safety)):
        rm: RewardModel | None = None
        for name, subset in (("helpfulness", help_pairs), ("safety", safe_pairs)):
            saved = saved_scores(path, name, subset)
            if saved is not None:
                r = scores_vs_gold(*saved, demo.gold.world, subset, items)
            else:
                rm = rm or RewardModel.load(path)
                r = reward_model_vs_gold(rm.score, demo.gold.world, subset, items)
            results[f"{kind}_rm/{name}_pairs"] = r
            rows.append([f"{kind} RM, {name} pairs", *[pct(r["accuracy"].get(level)) for level in RATINGS],
                         pct(r["accuracy"]["all"]), pct(r["prefers_wrong"]) if r["right_vs_wrong_pairs"] else "-",
                         pct(r["prefers_wrong_same_form"])])
    demo.results.setdefault("gold", {})["reward"] = results
    section.table(["reward model, held-out pairs", *[r.replace("_", " ") for r in RATINGS], "all",
                   "prefers a wrong answer", "... of the same form"], rows,
                  caption="Gold: agreement (%) with the gold judge's preference on held-out world comparisons, by "
                          "the gold rating level (the gap in gold score; the annotator's noisy labels are what the RMs "
                          "trained on), and how often each RM scores a wrong answer above a right one where exactly "
                          "one of the two is right (and where both are tidy and concise, so that only knowledge of "
                          "the world tells them apart; 50 is chance)")


def run(demo: Demo, section: Section, chat: ChatModel | None) -> Done[RewardModels]:
    sft = need(chat, "the reward models start from the SFT model, and SFT did not finish").checkpoint
    if demo.world == "stdlib":
        ensure_comparisons(quiet=demo.quiet)
    stage_start, stage_end = time.time(), demo.budget.deadline("reward")
    plans: dict[str, FitPlan] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    checkpoints: dict[str, Path] = {}
    for kind, path in RECIPES.items():
        run_dir = demo.run_dir(f"rm-{kind}")
        recipe = demo.load(RewardRecipe, path, [f"base={sft}", f"out_dir={run_dir}", "save_every=0",
                                                  "keep_last=1", "max_steps=null", f"data.val_max={GOLD_PAIRS}"])
        share_end = stage_start + (stage_end - stage_start) * (RM_SHARES["helpfulness"] if kind == "helpfulness"
                                                               else 1.0)
        try:
            rm_run = build_reward(recipe, quiet=True)
            cap = rm_run.trainer.recipe.max_steps
            t0 = time.time()
            evaluate_at_start(rm_run)
            eval_s = time.time() - t0
            # what follows the training inside the stage's time: the RM's final held-out evaluation (the only one
            # after the start: the gold table reuses its scores), and after the last RM the rest of the section
            reserve = eval_s * (1 + (AFTER_TRAINING if kind == list(RECIPES)[-1] else 0))
            result, plans[kind] = fit_within(rm_run.trainer, share_end, cap=cap, quiet=demo.quiet,
                                             desc=f"{kind} RM", evals=1, reserve_s=reserve)
        finally:
            shutdown()
        if result.checkpoint is None:
            raise Llama2Error(f"the demo's {kind} RM saved no checkpoint")
        records[kind] = run_metrics(run_dir)
        checkpoints[kind] = Path(result.checkpoint)
        demo.results[f"rm_{kind}_checkpoint"] = str(result.checkpoint)
    rms = RewardModels(checkpoints["helpfulness"], checkpoints["safety"])
    help_last = [r for r in records["helpfulness"] if "val_accuracy" in r][-1]
    safe_last = [r for r in records["safety"] if "val_accuracy" in r][-1]
    by_rating = {r: help_last.get(f"val_accuracy/helpfulness/{r}") for r in RATINGS}
    demo.results.update({f"rm_helpfulness_{r}": v for r, v in by_rating.items()})
    demo.results["rm_safety_on_safety"] = safe_last.get("val_accuracy/safety")
    world_text = (
        "Two reward models (`llama2.stages.reward`, `configs/world/reward-helpfulness.yaml` and `reward-safety.yaml`), "
        "each the SFT model with its LM head replaced by a scalar head, trained with the binary ranking loss and the "
        "paper's small margin m(r) (Table 27) on the world's comparisons: two answers to a training question of "
        "different gold quality (right, untidy, wordy, wrong, wrong and wordy, degenerate, a needless refusal), the "
        "preference and its rating level given by a simulated annotator who sees the gold gap through Gaussian noise "
        "(so close pairs are sometimes flipped); safety pairs prefer a refusal of a harmful request and the right "
        "answer to a benign look-alike. The helpfulness RM's epoch adds 15% safety pairs, the safety RM's 10% "
        "helpfulness pairs. Training: ")
    section.text(world_text + "; ".join(f"{kind} RM {plan_steps(plans[kind])}" for kind in RECIPES) + "."
                 if demo.world == "world" else
        "Two reward models (`llama2.stages.reward`, `configs/tiny/reward-helpfulness.yaml` and "
        "`reward-safety.yaml`), each the SFT model with its LM head replaced by a scalar head, trained with the binary "
        "ranking loss and the paper's small margin m(r) (Table 27) on the built-in comparisons: a real answer against, "
        "from far to near, an answer to another question (significantly better), its words shuffled (better), its "
        "first half (slightly better) and a one- or two-word edit (negligibly better); and the synthetic safety set "
        "(a refusal preferred for harmful requests, a helpful answer preferred over a needless refusal for benign "
        "look-alikes that share their words, the same answer styles chosen for one and rejected for the other). "
        "The helpfulness RM's epoch is the helpfulness comparisons plus 15% safety ones; the safety RM's is the "
        "safety comparisons plus 10% helpfulness ones (the paper's 90/10). Training: "
        + "; ".join(f"{kind} RM {plan_steps(plans[kind])}" for kind in RECIPES) + ".")
    rows = table_8_rows(records["helpfulness"], "helpfulness") + table_8_rows(records["safety"], "safety")
    rows.append(["paper: Helpfulness RM, Meta Helpful test set", *[f"{PAPER_TABLE_8[r]:.1f}" for r in RATINGS],
                 f"{PAPER_TABLE_8['all']:.1f}"])
    section.table(["reward model, test set", *[r.replace("_", " ") for r in RATINGS], "all"], rows,
                  caption="Held-out accuracy (%) of preferring the chosen answer, per preference rating (the paper's "
                          "Table 8; ties count as half). Before training the head is fresh (scores near zero); both "
                          "RMs start from the same SFT model and the same seeded head, so their rows before training "
                          "agree. The safety comparisons are all rated significantly better.")
    if demo.gold is not None:  # beside Table 8: the same RMs against the truth
        reward_gold(demo, section, rms)
    breakdown = []
    for kind in RECIPES:
        lines = [json.loads(x) for x in (demo.out / f"rm-{kind}" / "heldout_scores.jsonl").read_text().splitlines()]
        cells = []
        for source in (("world:harmful", "world:benign") if demo.world == "world" else
                       ("safety:harmful", "safety:benign")):
            mine = [x for x in lines if x["source"] == source]
            right = sum(x["chosen"] > x["rejected"] for x in mine)
            cells.append(f"{right} of {len(mine)}")
        breakdown.append([f"{kind} RM", *cells])
    section.table(["reward model", "harmful request: refusal preferred", "benign look-alike: helpful answer preferred"],
                  breakdown, caption="Held-out safety prompts (requests never trained on), after training")
    for kind in RECIPES:
        copy_figure(section, demo.out / f"rm-{kind}" / "score_histogram.png", demo.out, f"rm-{kind}",
                    f"{kind} RM: held-out scores of the chosen and rejected answers")
        run_figures(section, demo.out / f"rm-{kind}", demo.out, f"rm-{kind}", f"{kind} RM")
    examples = safety_examples(rms) if demo.world == "stdlib" else None
    if examples:
        prompts, cols = examples
        section.samples(prompts, cols, caption="Held-out safety prompts: each RM's sigmoid score of a refusal and of "
                                               "a helpful answer")
    return Done(f"reward models: helpfulness RM held-out accuracy {pct(help_last.get('val_accuracy/helpfulness'))}% "
                f"(significantly better {pct(by_rating['significantly_better'])}%, negligibly "
                f"{pct(by_rating['negligibly_better'])}%), safety RM on held-out safety pairs "
                f"{pct(safe_last.get('val_accuracy/safety'))}%", rms)
