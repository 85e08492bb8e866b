"""9. Safety context distillation from the latest chat model with the demo's safety RM: how many pre-prompted
answers were kept per category, the safety RM's score distributions (Figure 16), violation and false-refusal
rates before and after on held-out prompts, and sample answers."""

from __future__ import annotations

import json
import time
from typing import Any

from ...data.world import data_path, read_gold
from ...eval.gold import judge_answers, safety_rates
from ...eval.redteam import percent
from ...stages.safety import DistillSafetyRecipe, distill_safety, kept_table
from ..report import Section
from .artifacts import ChatModel, Policy, RewardModels
from .common import Demo, Done, copy_figure, need, sized

SECONDS_PER_PROMPT = 0.25  # measured: both answers, scoring and the fine-tuning's share, per training prompt
FLOOR_S, FULL_S = 11.0, 25.0  # seconds on 24 prompts, 48 held out, at the smallest (replay 32) and full size


def run(demo: Demo, section: Section, start: Policy | ChatModel | None, rms: RewardModels | None) -> Done[Policy]:
    message = "safety distillation needs a chat model and the safety RM, and they did not finish"
    base, rms = need(start, message).checkpoint, need(rms, message)
    run_dir = demo.run_dir("safety")
    left = demo.budget.left("safety")
    prompts = int(max(24, left / SECONDS_PER_PROMPT))
    held = "null" if left > 40 else "48"  # null: all; the first 48 cover every risk category and attack style
    overrides = [f"base={base}", f"safety_rm={rms.safety}", f"out_dir={run_dir}", "base_recipe=null",
                 "safety_rm_recipe=null", f"prompts.max_prompts={prompts}", f"prompts.held_out={held}",
                 f"helpfulness_rm={rms.helpfulness}", "helpfulness_rm_recipe=null"]
    full = demo.load(DistillSafetyRecipe, "distill-safety.yaml", overrides)
    # short of time: fewer SFT dialogues replayed in the fine-tuning (its length follows)
    replay = sized(full.replay, 32, demo.fraction("safety", FLOOR_S, FULL_S))
    recipe = demo.load(DistillSafetyRecipe, "distill-safety.yaml", [*overrides, f"replay={replay}"])
    t0 = time.time()
    result = distill_safety(recipe, quiet=True, unchanged_if_empty=True)
    seconds = time.time() - t0
    rows = [json.loads(x) for x in (run_dir / "distill.jsonl").read_text().splitlines()]
    section.text(
        f"Safety context distillation (`llama2.stages.safety`, `{demo.recipe_name('distill-safety.yaml')}`) from the latest "
        f"chat model, in {seconds:.0f} s: the model answered {len(rows)} adversarial training prompts of the "
        "built-in synthetic set (harmful requests and requests for unqualified advice, asked directly, in a "
        "role-play and as hypothetical fiction) plainly and with a per-category safety pre-prompt (the tiny recipe "
        "also starts the answer with the category's answer template); the safety RM kept "
        f"{result.kept} pre-prompted answers that it scored higher than the plain ones, and the SFT stage trained "
        f"them in without the pre-prompt, with the benign look-alikes' helpful answers and {recipe.replay} SFT "
        "dialogues mixed in. "
        + ("No pre-prompted answer scored higher than the plain one at this size: there was nothing to distil, and "
           "the model passes on unchanged (after = before below). " if result.kept == 0 else "")
        + "The red-team evaluation answers held-out prompts with the paper's evaluation decoding (temperature 0.1, "
        f"top-p 0.9): a violation is an answer the safety RM scores below {recipe.threshold}; a false refusal a "
        "refusal (a rule-based detector) of a benign look-alike.")
    kept = kept_table(rows)
    section.table(["group", "prompts", "kept", "kept %"],
                  [[("attack: " if k.startswith("attack:") else "") + k.split(":", 1)[1].replace("_", " "),
                    c["prompts"], c["kept"],
                    f"{100 * c['kept'] / max(1, c['prompts']):.0f}%"] for k, c in kept.items()],
                  caption="Pre-prompted answers kept (the safety RM scored them higher than the plain answer)")
    b, a = result.before, result.after
    table_rows = [["mean safety RM score (adversarial)", b["mean_safety_score"], a["mean_safety_score"]],
                  [f"violation rate (score < {recipe.threshold:g})", percent(b["violation_rate"]),
                   percent(a["violation_rate"])]]
    for c in sorted(b["violation_rate_by_category"]):
        table_rows.append([f"  {c.replace('_', ' ')}", percent(b["violation_rate_by_category"].get(c)),
                           percent(a["violation_rate_by_category"].get(c))])
    for style in sorted(b["violation_rate_by_attack"]):
        table_rows.append([f"  attack: {style.replace('_', ' ')}", percent(b["violation_rate_by_attack"].get(style)),
                           percent(a["violation_rate_by_attack"].get(style))])
    table_rows.append(["false-refusal rate (benign look-alikes)", percent(b["false_refusal_rate"]),
                       percent(a["false_refusal_rate"])])
    section.table(["held-out prompts", "before", "after distillation"], table_rows,
                  caption=f"{b['adversarial_prompts']} adversarial and {b['benign_prompts']} benign held-out prompts")
    for name, caption in (("safety_scores.png", "Safety RM scores: answers without and with the pre-prompt, and "
                                                "held-out answers before and after distillation (the paper's "
                                                "Figure 16)"),
                          ("redteam.png", "Violation rates per risk category and attack style, and false refusals, "
                                          "before and after")):
        copy_figure(section, run_dir / name, demo.out, "safety", caption)
    before = json.loads((run_dir / "redteam-before.json").read_text())["answers"]
    after = json.loads((run_dir / "redteam-after.json").read_text())["answers"]
    pick = [i for i, x in enumerate(before) if x["adversarial"]][:3] + [i for i, x in enumerate(before)
                                                                        if not x["adversarial"]][:3]
    section.samples([("(adversarial) " if before[i]["adversarial"] else "(benign) ") + before[i]["prompt"]
                     for i in pick],
                    {"before": [before[i]["answer"] for i in pick], "after": [after[i]["answer"] for i in pick]},
                    notes={"before": [f"R_s {before[i]['safe_probability']:.2f}" for i in pick],
                           "after": [f"R_s {after[i]['safe_probability']:.2f}" for i in pick]},
                    caption="Held-out prompts: answers before and after, with the safety RM's score")
    gold_text = ""
    if demo.gold is not None:
        rates = safety_gold(demo, section, before, after)
        gold_text = (f"; gold: violations {percent(rates['before']['violations']['rate'])} -> "
                     f"{percent(rates['after']['violations']['rate'])}, false refusals "
                     f"{percent(rates['before']['false_refusals']['rate'])} -> "
                     f"{percent(rates['after']['false_refusals']['rate'])}")
    demo.results.update({"safety_checkpoint": str(result.model),
                         "safety_before": b["mean_safety_score"], "safety_after": a["mean_safety_score"],
                         "false_refusals_before": b["false_refusal_rate"],
                         "false_refusals_after": a["false_refusal_rate"]})
    return Done(f"safety: kept {result.kept} of {len(rows)}; held-out safety RM {b['mean_safety_score']:.2f} -> "
                f"{a['mean_safety_score']:.2f}, violations {percent(b['violation_rate'])} -> "
                f"{percent(a['violation_rate'])}, false refusals {percent(b['false_refusal_rate'])} -> "
                f"{percent(a['false_refusal_rate'])}{gold_text}", Policy(result.model, "safety"))


def safety_gold(demo: Demo, section: Section, before: list[dict[str, Any]], after: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """The red-team answers before and after, judged by gold labels: a harmful request not refused is a violation,
    a benign look-alike refused is a false refusal (and its answer must still be right), per category and style."""
    items = {json.dumps(i.messages[-1]["content"]): i for i in read_gold(data_path("builtin:world/gold.val.jsonl"))
             if i.safety}
    out: dict[str, Any] = {}
    for name, answers in (("before", before), ("after", after)):
        pairs = [(items[json.dumps(a["prompt"])], a["answer"]) for a in answers if json.dumps(a["prompt"]) in items]
        run = judge_answers(demo.gold.world, [i for i, _ in pairs], [a for _, a in pairs])
        out[name] = safety_rates(run) | {"benign_correct": run.by_family.get("benign", {}).get("accuracy")}
    rows = []
    for key, label in (("violations", "violations (harmful requests answered)"),
                       ("false_refusals", "false refusals (benign look-alikes refused)")):
        b, a = out["before"][key], out["after"][key]
        rows.append([label, b["n"], percent(b["rate"]), percent(a["rate"])])
        for group in ("category", "attack"):
            for g in sorted(b[group]):
                rows.append([f"  {group}: {g.replace('_', ' ')}", "", percent(b[group][g]),
                             percent(a[group].get(g))])
    rows.append(["benign look-alikes answered right", "", percent(out["before"]["benign_correct"]),
                 percent(out["after"]["benign_correct"])])
    section.table(["gold label", "n", "before", "after distillation"], rows,
                  caption="Gold: the same held-out answers judged by the world's labels (a harmful request's "
                          "right answer is a refusal; a benign look-alike's is the right fact, not a refusal)")
    demo.results.setdefault("gold", {})["safety"] = out
    return out
