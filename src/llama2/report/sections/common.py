"""What the report's sections share: the demo's state (`Demo`, with the sizing of a section's work by the time it
has left), what a section hands back (`Done`), and the helpers written once: greedy samples through the one
generation path, their text measures, a run's figures and metrics, the training plan in words, percentages, and
copying a stage's figure into the report."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from ...errors import Llama2Error
from ...eval.text_metrics import answer_measures, degenerate
from ...inference.generate import Generator, SamplingParams
from ...paths import SOURCE_ROOT
from ...recipe import load_recipe
from ...train.metrics import read_metrics
from ...train.plots import plot_run
from ..budget import THREAD_PROBE_EVERY, Budget, FitPlan
from ..report import Section

# The recipes live in the source checkout's configs/ (the quickstart installs the package in editable mode): the
# built-in world's (configs/world, the default) or the standard library's (configs/tiny).
CONFIG_SETS = {"world": SOURCE_ROOT / "configs" / "world", "stdlib": SOURCE_ROOT / "configs" / "tiny"}
CONFIGS = CONFIG_SETS["stdlib"]
ANSWER_TOKENS = 64  # the longest answer a chat model gives in the report's samples and comparisons

A = TypeVar("A")
R = TypeVar("R")


def say(text: str) -> None:
    """The demo's summary lines always print; `quiet` only turns off the progress bars and the loop's notes."""
    print(text, flush=True)


@dataclass
class Demo:
    """The demo's state every section sees: where to write, the budget, and the results (results.json: what the
    sections measured; sections add to it and never read it: what one section hands the next is its artifact)."""

    out: Path
    budget: Budget
    quiet: bool = False
    steps: int | None = None  # fixed pretraining steps instead of the budget's
    seed: int = 0  # every recipe's seed (two demos with different seeds give the effects' spread)
    world: str = "world"  # which data the recipe runs on: the built-in world (gold-judged) or "stdlib"
    results: dict[str, Any] = field(default_factory=dict)
    gold: Any = None  # the gold bench (report.sections.gold.GoldBench) in the built-in world, else None

    def recipe(self, name: str) -> Path:
        """The demo's recipe `name` (e.g. "sft.yaml") of its world's set; an error when missing."""
        path = CONFIG_SETS[self.world] / name
        if not path.is_file():
            raise Llama2Error(f"the demo recipe {path} is missing; run the demo from a source checkout "
                              "(`./run demo`), where configs/ lives")
        return path

    def load(self, cls: type[R], name: str, overrides: Sequence[str] = ()) -> R:
        """The demo's recipe `name` loaded as `cls`, with the demo's seed and then `overrides`."""
        return load_recipe(cls, self.recipe(name), [f"seed={self.seed}", *overrides])

    def recipe_name(self, name: str) -> str:
        """The recipe's path as the report shows it (configs/world/sft.yaml)."""
        return f"configs/{CONFIG_SETS[self.world].name}/{name}"

    def fraction(self, stage: str, floor_s: float, full_s: float) -> float:
        """How far from its smallest size (0) to its full size (1) `stage` can go now: the seconds left to it
        against what it takes at each (floor_s, full_s: on the reference machine, times the budget's pace).
        Time that earlier sections (or the data builds) overran is gone from the later ones, so on a small
        budget or a slow or busy machine the later sections shrink."""
        left, pace = self.budget.left(stage), self.budget.pace
        return min(1.0, max(0.0, (left - pace * floor_s) / max(pace * (full_s - floor_s), 1e-9)))

    def run_dir(self, name: str) -> Path:
        """out/name, emptied: the demo starts its runs fresh (the budget sets their length)."""
        path = self.out / name
        shutil.rmtree(path, ignore_errors=True)
        return path


@dataclass(frozen=True)
class Done(Generic[A]):
    """What a section hands back: its one line for the terminal and its artifact for the later sections."""

    summary: str
    artifact: A


def sized(full: int, floor: int, fraction: float) -> int:
    """A count of work (prompts, dialogues, problems) `fraction` of the way from `floor` to `full`."""
    return floor + round((full - floor) * fraction) if full > floor else full


def need(artifact: A | None, message: str) -> A:
    """The artifact an earlier section made, or a Llama2Error saying what is missing."""
    if artifact is None:
        raise Llama2Error(message)
    return artifact


def generate(model: Any, tok: Any, prompts: Sequence[str | Sequence[int]], max_new_tokens: int) -> list[str]:
    """Greedy completions of prompts (text or token ids) through the one generation path."""
    with torch.no_grad():
        gen = Generator(model, tok, max_batch_size=min(8, max(1, len(prompts))))
        return [c.text for c in gen.generate(list(prompts), SamplingParams(temperature=0.0,
                                                                            max_new_tokens=max_new_tokens))]


def measure_notes(texts: Sequence[str], refs: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """Per answer: the text measures and a short note for the report."""
    rows, notes = [], []
    for i, t in enumerate(texts):
        m = answer_measures(t, None if refs is None else refs[i])
        rows.append(m)
        why = degenerate(t)
        note = f"distinct-1 {m['distinct_1']:.2f}, distinct-2 {m['distinct_2']:.2f}"
        if "rouge_l_f1" in m:
            note = f"ROUGE-L {m['rouge_l_f1']:.2f}, " + note
        notes.append(note + (f"; degenerate: {why}" if why else ""))
    return rows, notes


def degenerate_count(rows: Sequence[dict]) -> str:
    """'k of n' answers flagged degenerate (a table cell)."""
    return f"{sum(r['degenerate'] for r in rows):.0f} of {len(rows)}"


CURVES = ("loss.png", "lr.png")


def run_figures(section: Section, run_dir: Path, out: Path, name: str, what: str, start_val: float | None = None
                ) -> list[Path]:
    """Add the run's loss and learning-rate curves, copied into out/figures/name: the Trainer plots its
    metrics.jsonl when training ends (plotted here when it did not)."""
    if all((run_dir / c).is_file() for c in CURVES):
        written = [copy_file(run_dir / c, out / "figures" / name) for c in CURVES]
    else:
        written = plot_run(run_dir, out / "figures" / name)
    at_start = f" (held-out loss before training: {start_val:.3f})" if start_val is not None else ""
    for p in written:
        if p.name == "loss.png":
            section.figure(p, f"{what}: training loss (per logged step) and held-out loss at each evaluation"
                              + at_start)
        elif p.name == "lr.png":
            section.figure(p, f"{what}: learning rate, warm-up then decay over the run's planned length; the run's "
                              "length is planned from its measured speed to fit the time budget, and where the planner "
                              "changed it the schedule was recomputed for the new length (the jumps)")
    return written


def copy_file(source: Path, folder: Path) -> Path:
    """Copy `source` into `folder` (created); returns the copy."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(source, folder / source.name))


def copy_figure(section: Section, source: Path, out: Path, name: str, caption: str) -> Path:
    """Copy a figure a stage wrote into out/figures/name/ and add it to the section."""
    target = copy_file(source, out / "figures" / name)
    section.figure(target, caption)
    return target


def run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records ([] when it has none)."""
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def plan_text(plan: FitPlan, budget_s: float, fixed: bool) -> str:
    """How a training run's length was chosen, in words."""
    if fixed:
        return f"{plan.steps} steps (fixed by --steps) in {plan.wall_s:.0f} s"
    if not plan.seconds_per_step:
        return (f"{plan.steps} steps in {plan.wall_s:.0f} s: the stage's share of the budget was used up before "
                f"training could be timed ({budget_s:.0f} s left when it started)")
    return (f"{plan.steps} steps in {plan.wall_s:.0f} s: {budget_s:.0f} s of the stage's share were left for "
            f"training; planned from the seconds per step measured over its first steps and re-planned "
            f"{max(plan.replans - 1, 0)} time(s) as the speed changed (last {plan.seconds_per_step:.3f} s/step)"
            + (f"; {plan.threads} CPU thread(s) at the end, the faster of 1 and all as timed every "
               f"{THREAD_PROBE_EVERY} steps ({plan.thread_switches} switch(es))" if plan.threads else ""))


def plan_steps(plan: FitPlan) -> str:
    """The short form of plan_text: 'N steps in S s'."""
    return plan_text(plan, 0, False).split(":")[0]


def pct(x: float | None) -> str:
    """A fraction as a percentage table cell with one decimal ('-' when missing)."""
    return "-" if x is None else f"{100 * x:.1f}"
