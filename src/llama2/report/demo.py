"""`llama2 demo`: the system end to end on a laptop CPU within a time budget, written up as a report.

The driver: it builds the data every section reads (or finds it in the cache) and takes that time out of the
budget, then runs the report's sections in order, each within its share of what is left (`SHARES`; cumulative:
time a section leaves passes on, an overrun is taken from the later ones). Each section is a module of
`report/sections/` that fills its part of the report and hands the later sections a typed artifact (the
pretrained model, the chat model, the reward models, a policy). out/report.md, out/report.html and
out/results.json (what the sections measured) are rewritten after every section, so a killed demo still leaves
the report of what finished. A section that fails (after pretraining, which every other needs) is marked failed
with its reason, and the rest still run; the command then exits with an error naming the failed sections. Every
step is the library's own code; every number in the report is measured in this run.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..atomic import atomic_write_text
from ..errors import Llama2Error
from . import DEFAULT_BUDGET_MINUTES
from .budget import Budget
from .report import Report, Section
from .sections import (
    chat,
    evaluation,
    formats,
    gatt,
    generate,
    ppo,
    pretrain,
    rejection,
    reward,
    safety,
    sft,
)
from .sections import methods as methods_section
from .sections import tools as tools_section
from .sections.artifacts import ChatModel, RewardModels
from .sections.common import Demo, Done, say
from .sections.data import build_data

# Each section's share of the budget left after the data builds (cumulative: unused time passes on). The demo
# usually ends early by what SFT and the reward models leave when they reach their recipes' epochs.
SHARES = {"pretrain": 0.41, "generate": 0.01, "chat": 0.01, "sft": 0.15, "reward": 0.10, "rejection": 0.10,
          "ppo": 0.06, "gatt": 0.04, "safety": 0.06, "eval": 0.03, "tools": 0.0, "formats": 0.03}
# In the built-in world (one seed-0 demo, pace 2.55): SFT reaches its recipe's 3 epochs (456 steps) in ~90 s; the
# reward models take ~150 s (two trainings, then every held-out pair scored for the per-level and gold tables);
# rejection sampling ~50 prompts and PPO two runs (the recipe's beta and a small one) of 10-20 iterations in their
# shares; GAtt ~170 s (the policy's answers to 160 dialogues of 20 turns, 150 steps on them at a rate gentle enough
# to keep what the model knows, and adherence measured over 20 turns before and after); tool use at least 300
# steps to copy numbers and names (docs/tools.md), ~100 s, last, inheriting what the sections before it leave.
WORLD_SHARES = {"pretrain": 0.27, "generate": 0.005, "chat": 0.005, "sft": 0.1, "reward": 0.13, "rejection": 0.07,
                "ppo": 0.065, "gatt": 0.19, "safety": 0.05, "eval": 0.01, "tools": 0.095, "formats": 0.01}
# The seconds each section takes at its smallest size on the reference machine (2 idle cores): the sections
# before it leave this much, times the machine's pace measured by pretraining, for it.
FLOORS = {name: module.FLOOR_S for name, module in (
    ("generate", generate), ("chat", chat), ("sft", sft), ("reward", reward), ("rejection", rejection), ("ppo", ppo),
    ("gatt", gatt), ("safety", safety), ("eval", evaluation), ("tools", tools_section), ("formats", formats))}
# In the built-in world the smallest useful sizes are larger: SFT most of its epochs and the helpfulness RM about
# 100 steps (every later stage builds on them), rejection sampling about 30 prompts and PPO about 10 iterations in
# each of its two runs to show anything against gold, GAtt 20-turn dialogues of up to 1,024 tokens measured over 20
# turns, and pretraining about 275 steps. On a slow machine pretraining gives up its time first; where the floors
# fill the budget, every stage still gets its floor (Budget.deadline) and the demo runs over.
WORLD_FLOORS = {**FLOORS, **{name: module.WORLD_FLOOR_S for name, module in (
    ("pretrain", pretrain), ("sft", sft), ("reward", reward), ("rejection", rejection), ("ppo", ppo), ("gatt", gatt))}}
RESULTS = "results.json"

A = TypeVar("A")


class Driver:
    """Runs sections one after another into the report: the heading, the section's status, the report (and
    results.json) rewritten after each, the summary line. A section that fails is marked failed in the report
    (its traceback in failed-NAME.txt beside it) and gives no artifact; the sections after it still run (those
    that need its artifact fail at once, saying so), unless `essential`: then the demo stops there."""

    def __init__(self, demo: Demo, report: Report) -> None:
        self.demo, self.report = demo, report
        self.threads = torch.get_num_threads()
        self.failed: list[str] = []  # titles of the sections that failed

    def write(self) -> tuple[Path, Path]:
        paths = self.report.write()  # creates out/
        atomic_write_text(self.demo.out / RESULTS, json.dumps(self.demo.results, indent=1, default=str) + "\n")
        return paths

    def section(self, name: str, title: str, body: Callable[[Section], Done[A]], essential: bool = False) -> A | None:
        budget = self.demo.budget
        budget.begin(name)
        section = self.report.section(title, status="running")
        if budget.left(name) > 0:
            say(f"== {title} (until {budget.deadline(name) - budget.start:.0f} s of the {budget.total_s:.0f} s budget)")
        else:  # the one-line note: it runs anyway (the later sections need its model), at its smallest size
            say(f"== {title} (its share of the {budget.total_s:.0f} s budget is used up: at its smallest size)")
            section.text("Its share of the budget was used up before it started (by the data builds and the "
                         "sections before it, on this machine at this moment): it ran at its smallest size.")
        self.write()
        # every section starts on all threads: a training stage's ThreadChooser may have left one set (it was
        # faster there, for a while), and a section without a chooser (GAtt's fine-tuning) would keep it
        torch.set_num_threads(self.threads)
        try:
            done = body(section)
        except BaseException as e:
            section.status = "failed"
            section.text(f"Failed: {type(e).__name__}: {e}", trusted=False)
            self.write()
            if essential or not isinstance(e, Exception):  # an interrupt, or nothing after it could run
                raise
            trace = self.demo.out / f"failed-{name}.txt"
            atomic_write_text(trace, "".join(traceback.format_exception(e)))
            self.failed.append(title)
            say(f"   failed: {type(e).__name__}: {e} (traceback: {trace})  [{budget.elapsed():.0f} s]")
            return None
        if section.status == "running":
            section.status = "done"
        self.write()
        say(f"   {done.summary}  [{budget.elapsed():.0f} s]")
        return done.artifact


def run_demo(out: Path, budget_minutes: float = DEFAULT_BUDGET_MINUTES, quiet: bool = False,
             steps: int | None = None, world: str = "world", seed: int = 0) -> dict[str, Any]:
    """Run every section within the budget, writing out/report.md, out/report.html and out/results.json after
    each; returns the results. steps: fixed pretraining steps instead of the budget's; world: "world" (the
    built-in world, gold-judged) or "stdlib"; seed: every stage's seed."""
    out = Path(out)
    shares = WORLD_SHARES if world == "world" else SHARES
    budget = Budget(budget_minutes * 60.0, dict(shares), floors=dict(WORLD_FLOORS if world == "world" else FLOORS))
    report = Report(out, "llama2 demo")
    demo = Demo(out, budget, quiet=quiet, steps=steps, seed=seed, world=world)
    demo.results.update({"world": world, "seed": seed})
    say("== Data (built where missing, cached in $LLAMA2_CACHE)")
    data = build_data(demo)
    budget.fixed_s = budget.elapsed()
    report.intro = (f"Everything below ran in this demo on a CPU with {torch.get_num_threads()} thread(s), within a "
                    f"budget of {budget_minutes:g} minutes: building the data took {budget.fixed_s:.0f} s of it, and "
                    f"the stages shared the rest ({', '.join(f'{k} {v:.0%}' for k, v in shares.items())}, the rest "
                    "kept for stages to come); every number is measured in this run.")
    say(f"   data: {'in the cache' if data.pretrain_cached else 'built'}, {budget.fixed_s:.0f} s  "
        f"[{budget.elapsed():.0f} s]")
    driver = Driver(demo, report)
    run = driver.section

    pre = run("pretrain", "1. Pretraining", lambda s: pretrain.run(demo, s, data), essential=True)
    run("generate", "2. Generating", lambda s: generate.run(demo, s, pre))
    run("chat", "3. The Llama 2 chat format", lambda s: chat.run(demo, s, pre))
    chat_model = run("sft", "4. Supervised fine-tuning", lambda s: sft.run(demo, s, pre))
    rms = run("reward", "5. Reward models", lambda s: reward.run(demo, s, chat_model))
    rs = run("rejection", "6. Rejection sampling", lambda s: rejection.run(demo, s, chat_model, rms))
    # in the world PPO starts where rejection sampling did, so each is measured against gold from one start
    ppo_policy = run("ppo", "7. PPO", lambda s: ppo.run(demo, s, chat_model if world == "world" else rs, rms))
    gatt_model = run("gatt", "8. Ghost Attention", lambda s: gatt.run(demo, s, ppo_policy or rs or chat_model))
    final = run("safety", "9. Safety context distillation",
                lambda s: safety.run(demo, s, gatt_model or ppo_policy or rs or chat_model, rms))
    models = {"pretrained": pre, "SFT": chat_model, **({"RLHF (rejection sampling)": rs} if world == "world" else {}),
              "RLHF (PPO)": ppo_policy, "+ GAtt": gatt_model,
              "final (GAtt + safety)": final}
    run("eval", "10. Evaluation", lambda s: evaluation.run(demo, s, models, rms, data.val_file))
    run("tools", "11. Tool use", lambda s: tools_section.run(demo, s, chat_model))
    run("formats", "12. Checkpoint formats", lambda s: formats.run(demo, s, pre))

    demo.results["seconds"] = round(budget.elapsed(), 1)
    demo.results["failed_sections"] = driver.failed
    report.footer = [f"Done in {demo.results['seconds']:.0f} s (budget {budget.total_s:.0f} s)."]
    md, html_path = driver.write()
    if driver.failed:
        raise Llama2Error(f"the demo ran to the end, but {len(driver.failed)} section(s) failed: "
                          f"{', '.join(driver.failed)}; {md} says why, and failed-*.txt in {out} hold the tracebacks")
    chat_ckpt = chat_model.checkpoint if chat_model else pre.checkpoint
    opening = "Return the" if world == "stdlib" else f"{next(iter(demo.gold.world.people))} lives in"
    say(f"\nDone in {demo.results['seconds']:.0f} s (budget {budget.total_s:.0f} s). Report: {md} ({html_path.name} "
        f"beside it). Next:\n   llama2 generate {pre.checkpoint} --prompt '{opening}'\n   llama2 chat "
        f"{chat_ckpt}\n   llama2 plot {out / 'pretrain'}"
        + ("" if world == "stdlib" else f"\n   llama2 eval gold {pre.checkpoint} {chat_ckpt}"))
    return demo.results


def run_methods(out: Path, sft: Path, helpfulness_rm: Path, safety_rm: Path, budget_minutes: float = 15.0,
                quiet: bool = False, seed: int = 0, methods: tuple[str, ...] = methods_section.METHODS,
                seeds: int = 1) -> dict[str, Any]:
    """`llama2 compare-methods`: the methods section alone (report/sections/methods.py) from a given SFT model
    and reward models, within the budget, into out/report.md, out/report.html and out/results.json."""
    from .sections.gold import GoldBench

    out = Path(out)
    budget = Budget(budget_minutes * 60.0, {"methods": 1.0})
    report = Report(out, "llama2 compare-methods")
    demo = Demo(out, budget, quiet=quiet, seed=seed, world="world")
    demo.gold = GoldBench.load()
    demo.results.update({"world": "world", "seed": seed, "seeds": seeds, "sft": str(sft),
                         "helpfulness_rm": str(helpfulness_rm), "safety_rm": str(safety_rm)})
    report.intro = (f"Every method below started from {sft} on a CPU with {torch.get_num_threads()} thread(s), "
                    f"within a budget of {budget_minutes:g} minutes shared equally; every number is measured in "
                    "this run, against the built-in world's gold judge.")
    Driver(demo, report).section("methods", "Methods compared on gold", lambda s: methods_section.run(
        demo, s, ChatModel(sft), RewardModels(helpfulness_rm, safety_rm), methods, seeds), essential=True)
    demo.results["seconds"] = round(budget.elapsed(), 1)
    Driver(demo, report).write()
    return demo.results
