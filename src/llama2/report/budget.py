"""A wall-clock budget shared by the demo's stages, and training to a deadline with the shared loop.

Work done before the stages (the demo's data builds) comes out of the total first; each stage owns a fixed
share of the rest. Shares are cumulative, so a stage must be done by start + builds + rest x (its share + the
shares before it): time an earlier stage leaves unused passes on to the next, and an overrun is taken from the
later ones. On a small budget a stage's deadline comes earlier where the stages after it need their floors
(the seconds they take at their smallest size, times how much slower this machine is than the reference).

A training stage turns its time into steps with `fit_within`, a step hook of the Trainer
(`Trainer.fit(on_step=...)`): it measures the seconds per optimiser step over the run's first steps (after the
first, which pays one-off costs) and sets max_steps = steps done + time left / seconds per step; it measures
again as it trains (over the last 50 steps, evaluations included when they fall in them) and re-plans whenever
the projected finish is more than 3% of the stage's time late or 10% early (the learning-rate schedule follows
the new length from then on; warm-up does not depend on it), and always stops in time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import yaml
from tqdm import tqdm

from ..atomic import atomic_write_text
from ..recipe import to_dict
from ..train.loop import StepInfo, Trainer, TrainResult

REPLAN_TOLERANCE = 0.10  # re-plan when the projected finish is this fraction of the stage's time early ...
LATE_TOLERANCE = 0.03  # ... or this fraction late
LOG_POINTS = 200  # metrics.jsonl records a run gets (log_every is set from the planned steps)
FIRST_PLAN_STEP = 3  # steps timed before the first plan (the first step pays one-off costs and is not counted)
THREAD_PROBE_EVERY = 100  # steps between trials of the other CPU thread count (ThreadChooser)
THREAD_RECHECK = 10  # steps after a switch before the count it left is tried again
WINDOW = 50  # the seconds per step are measured over the last this many steps (a shared machine's speed drifts)


@dataclass
class Budget:
    """`total_s` seconds from `start`: the first `fixed_s` of them go to work done before the stages (the demo's
    data builds, set once they are done), and `shares` (stage name -> fraction, in stage order) split the rest.
    `floors` (stage name -> seconds) are what each stage takes at its smallest size on the reference machine,
    `pace` how much slower this machine is now: a stage's deadline leaves pace x the floors of the stages after
    it, so that on a small budget the early, elastic stages (training to a deadline) make room for the fixed
    costs of the later ones."""

    total_s: float
    shares: dict[str, float]
    start: float = field(default_factory=time.time)
    fixed_s: float = 0.0
    floors: dict[str, float] = field(default_factory=dict)
    pace: float = 1.0
    started: dict[str, float] = field(default_factory=dict)  # stage -> when it began (begin())

    def holds_floors(self) -> bool:
        """Whether the budget could hold every stage's floor on the reference machine (a full run, not a smoke
        run of a minute or two, where every stage only shrinks)."""
        return self.total_s >= sum(self.floors.values())

    def begin(self, stage: str) -> None:
        """`stage` starts now: from here its deadline leaves it at least pace x its floor."""
        self.started[stage] = time.time()

    def deadline(self, stage: str) -> float:
        """The time (time.time()) by which `stage` must be done: start + fixed_s + the rest x cumulative share,
        or earlier where the later stages' floors need the time; but, once it has begun and where the budget holds
        the floors, never less than pace x its own floor after its start (on a machine so slow that the floors fill
        the budget, every stage still runs at its smallest useful size, and the whole runs over the budget)."""
        if stage not in self.shares:
            raise KeyError(f"no budget share for stage {stage!r}; shares: {list(self.shares)}")
        names = list(self.shares)
        cum = sum(self.shares[n] for n in names[:names.index(stage) + 1])
        rest = max(self.total_s - self.fixed_s, 0.0)
        later = sum(self.floors.get(n, 0.0) for n in names[names.index(stage) + 1:])
        planned = min(self.start + self.fixed_s + rest * min(cum, 1.0), self.start + self.total_s - self.pace * later)
        if stage in self.started and self.holds_floors():
            planned = max(planned, self.started[stage] + self.pace * self.floors.get(stage, 0.0))
        return planned

    def left(self, stage: str) -> float:
        """Seconds until `stage`'s deadline (negative when it has passed)."""
        return self.deadline(stage) - time.time()

    def elapsed(self) -> float:
        return time.time() - self.start


@dataclass
class FitPlan:
    """What fit_within decided and measured."""

    steps: int = 0
    seconds_per_step: float | None = None
    replans: int = 0
    wall_s: float = 0.0
    stopped_by_deadline: bool = False
    threads: int = 0  # the CPU thread count in use at the end
    thread_switches: int = 0


class ThreadChooser:
    """Picks the faster CPU thread count as training runs: on a machine shared with other work, PyTorch's
    threads wait on each other and one thread can be several times faster than all of them. Every `every`
    steps (and at the start) it runs two steps with the other count (all threads <-> one) and switches when
    the second of them is more than 15% faster than the lower median of the last steps with the current count.
    A switch is tried again `recheck` steps later: one slow step of all threads (a write, a stray process) once
    made a demo's pretraining switch to one thread at its first trial and run at half speed to its end."""

    def __init__(self, every: int = THREAD_PROBE_EVERY, first: int = 3, recheck: int = THREAD_RECHECK) -> None:
        self.full = torch.get_num_threads()
        self.current = self.full
        self.every, self.recheck = every, recheck
        self.probe_at = first  # the first of the next trial's two steps (0-based)
        self.times: list[tuple[int, int, float]] = []  # (step, threads, seconds)
        self.switches = 0

    def _probing(self, step: int) -> bool:
        return self.full > 1 and self.probe_at <= step <= self.probe_at + 1

    def record(self, step: int, seconds: float) -> None:
        """The duration of step `step` (0-based); decide after the second step of a trial."""
        threads = self.threads_for(step)
        self.times.append((step, threads, seconds))
        if self.full > 1 and step == self.probe_at + 1:
            mine = sorted(t for s, n, t in self.times[-12:-2] if n == self.current and s > 0)
            switched = bool(mine) and seconds < 0.85 * mine[(len(mine) - 1) // 2]
            if switched:
                self.current = threads
                self.switches += 1
            self.probe_at = step + 1 + (self.recheck if switched else self.every)

    def threads_for(self, step: int) -> int:
        if self._probing(step):
            return 1 if self.current != 1 else self.full
        return self.current


def fit_within(trainer: Trainer, deadline: float | Callable[[], float], *, cap: int, reserve_s: float = 0.0,
               quiet: bool = False, desc: str = "train", evals: int = 5, min_steps: int = 1,
               choose_threads: bool = True) -> tuple[TrainResult, FitPlan]:
    """Run trainer.fit() so that training (with its evaluations and saves) ends by `deadline` - `reserve_s`
    (time.time() seconds; or a function giving it, called after every step: a deadline that moves as the budget
    learns the machine's pace), with at most `cap` steps and at least `min_steps`. A step hook (Trainer.fit(on_step=))
    times the steps and re-plans max_steps, draws one progress bar (the loop's own is turned off) and sets
    eval_every to give about `evals` evaluations and log_every for about LOG_POINTS logged steps. choose_threads
    (on CPU): a ThreadChooser picks the faster thread count as it runs, and leaves it set.
    Returns (TrainResult, FitPlan). recipe.yaml in the run directory is rewritten with the final max_steps."""
    recipe = trainer.recipe
    chooser = ThreadChooser() if choose_threads and trainer.device.type == "cpu" else None
    plan = FitPlan()
    start = time.time()
    marks: list[tuple[int, float]] = []  # (steps done, time) at the end of each step = the start of the next
    planned: list[int] = []  # steps at which the length was (re)computed
    deadline_of = deadline if callable(deadline) else (lambda: deadline)
    end_at = deadline_of() - reserve_s

    def set_steps(n: int) -> bool:
        n = max(min(n, cap), min_steps, trainer.step)  # trainer.step: this step is the last
        changed = n != recipe.max_steps
        recipe.max_steps = n
        if bar.total != n:
            bar.total = n
            bar.refresh()
        return changed

    def on_step(t: Trainer, info: StepInfo) -> None:
        nonlocal end_at
        now = time.time()
        end_at = deadline_of() - reserve_s
        if not marks:
            marks.append((t.step - 1, info.started))
        if chooser is not None:
            chooser.record(marks[-1][0], now - marks[-1][1])
        marks.append((t.step, now))
        if "loss" in info.stats:
            bar.set_postfix(loss=f"{info.stats['loss']:.3f}", refresh=False)
        bar.update(1)
        if t.step >= FIRST_PLAN_STEP:
            s0, t0 = marks[max(1, len(marks) - 1 - WINDOW)]  # the recent steps, never the first
            sps = (now - t0) / max(t.step - s0, 1)
            plan.seconds_per_step = sps
            projected = now + (recipe.max_steps - t.step) * sps
            span = max(end_at - start, 1e-9)
            late, early = projected - end_at > LATE_TOLERANCE * span, end_at - projected > REPLAN_TOLERANCE * span
            if not planned or late or (early and recipe.max_steps < cap):
                if set_steps(t.step + max(int((end_at - now) / sps), 0)) or not planned:
                    plan.replans += 1
                planned.append(t.step)
                recipe.eval_every = max(1, math.ceil(recipe.max_steps / max(evals, 1)))  # at most `evals`
                recipe.log_every = max(1, recipe.max_steps // LOG_POINTS)
        elif now >= end_at and t.step >= min_steps:
            set_steps(t.step)  # out of time before the first measurement: this step is the last
        if chooser is not None:
            torch.set_num_threads(chooser.threads_for(t.step))  # for the next step

    recipe.max_steps = max(cap, min_steps, trainer.step + 1)  # until the first plan
    recipe.log_every = 1  # the first steps are logged one by one; then about LOG_POINTS records in all
    bar = tqdm(total=None, initial=trainer.step, unit="step", desc=desc, disable=quiet,  # total: once planned
               dynamic_ncols=True)
    if chooser is not None:
        torch.set_num_threads(chooser.threads_for(trainer.step))
    quiet_before = trainer.quiet
    trainer.quiet = True  # the bar above replaces the loop's
    try:
        result = trainer.fit(on_step=on_step)
    finally:
        trainer.quiet = quiet_before
        bar.close()
    plan.steps = result.step
    plan.wall_s = time.time() - start
    if chooser is not None:
        torch.set_num_threads(chooser.current)
        plan.threads, plan.thread_switches = chooser.current, chooser.switches
    plan.stopped_by_deadline = result.step < cap
    if trainer.env.is_main:
        atomic_write_text(trainer.run_dir / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return result, plan
