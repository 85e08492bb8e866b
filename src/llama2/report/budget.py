"""A wall-clock budget shared by the demo's stages, and training to a deadline with the shared loop.

Each stage owns a fixed share of the total; shares are cumulative, so a stage must be done by
start + total x (its share + the shares before it): time an earlier stage leaves unused passes on to the next,
and an overrun is taken from the later ones. A training stage turns its time into steps with `fit_within`:
it measures the seconds per optimiser step over the run's first steps (after the first, which pays one-off
costs) and sets max_steps = steps done + time left / seconds per step; it measures again as it trains (over the
last 50 steps, evaluations included when they fall in them) and re-plans whenever the projected finish is
more than 3% of the stage's time late or 10% early (the learning-rate schedule follows the new length from then on; warm-up does
not depend on it), and always stops in time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..atomic import atomic_write_text

REPLAN_TOLERANCE = 0.10  # re-plan when the projected finish is this fraction of the stage's time early ...
LATE_TOLERANCE = 0.03  # ... or this fraction late
LOG_POINTS = 200  # metrics.jsonl records a run gets (log_every is set from the planned steps)
FIRST_PLAN_STEP = 3  # steps timed before the first plan (the first step pays one-off costs and is not counted)
THREAD_PROBE_EVERY = 100  # steps between trials of the other CPU thread count (ThreadChooser)
WINDOW = 50  # the seconds per step are measured over the last this many steps (a shared machine's speed drifts)


@dataclass
class Budget:
    """`total_s` seconds from `start`, split by `shares` (stage name -> fraction, in stage order)."""

    total_s: float
    shares: dict[str, float]
    start: float = field(default_factory=time.time)

    def deadline(self, stage: str) -> float:
        """The time (time.time()) by which `stage` must be done: start + total x cumulative share."""
        cum = 0.0
        for name, share in self.shares.items():
            cum += share
            if name == stage:
                return self.start + self.total_s * min(cum, 1.0)
        raise KeyError(f"no budget share for stage {stage!r}; shares: {list(self.shares)}")

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
    the second of them is more than 15% faster than the median of the last steps with the current count."""

    def __init__(self, every: int = THREAD_PROBE_EVERY, first: int = 3) -> None:
        import torch

        self.full = torch.get_num_threads()
        self.current = self.full
        self.every, self.first = every, first
        self.times: list[tuple[int, int, float]] = []  # (step, threads, seconds)
        self.switches = 0

    def _probing(self, step: int) -> bool:
        k = step - self.first
        return self.full > 1 and k >= 0 and k % self.every in (0, 1)

    def record(self, step: int, seconds: float) -> None:
        """The duration of step `step` (0-based); decide after the second step of a probe."""
        threads = self.threads_for(step)
        self.times.append((step, threads, seconds))
        if self._probing(step) and not self._probing(step + 1):
            mine = sorted(t for s, n, t in self.times[-12:-2] if n == self.current and s > 0)
            if mine and seconds < 0.85 * mine[len(mine) // 2]:
                self.current = threads
                self.switches += 1

    def threads_for(self, step: int) -> int:
        if self._probing(step):
            return 1 if self.current != 1 else self.full
        return self.current


def fit_within(trainer: Any, deadline: float, *, cap: int, reserve_s: float = 0.0, quiet: bool = False,
               desc: str = "train", evals: int = 5, min_steps: int = 1,
               choose_threads: bool = True) -> tuple[Any, FitPlan]:
    """Run trainer.fit() so that training (with its evaluations and saves) ends by `deadline` - `reserve_s`
    (time.time() seconds), with at most `cap` steps and at least `min_steps`. Wraps the trainer's step
    (its step_fn, or the default backward + optimizer_step) to time steps and re-plan max_steps, draws one
    progress bar (the loop's own is turned off) and sets eval_every to give about `evals` evaluations and
    log_every for about LOG_POINTS logged steps. choose_threads (on CPU): a ThreadChooser picks the faster thread
    count as it runs, and leaves it set.
    Returns (TrainResult, FitPlan). recipe.yaml in the run directory is rewritten with the final max_steps."""
    from tqdm import tqdm

    from ..recipe import to_dict

    recipe = trainer.recipe
    inner = trainer.step_fn
    chooser = ThreadChooser() if choose_threads and trainer.device.type == "cpu" else None
    plan = FitPlan()
    start = time.time()
    marks: list[tuple[int, float]] = []  # (steps done, time) at the start of each step
    planned: list[int] = []  # steps at which the length was (re)computed
    end_at = deadline - reserve_s

    def set_steps(n: int) -> bool:
        n = max(min(n, cap), min_steps, trainer.step + 1)
        changed = n != recipe.max_steps
        recipe.max_steps = n
        if bar.total != n:
            bar.total = n
            bar.refresh()
        return changed

    def step(t: Any) -> Mapping[str, float]:
        import torch

        now = time.time()
        if chooser is not None:
            if marks:
                chooser.record(marks[-1][0], now - marks[-1][1])
            torch.set_num_threads(chooser.threads_for(t.step))
        marks.append((t.step, now))
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
                recipe.eval_every = max(1, recipe.max_steps // max(evals, 1))
                recipe.log_every = max(1, recipe.max_steps // LOG_POINTS)
        elif now >= end_at and t.step >= min_steps:
            set_steps(t.step + 1)  # out of time before the first measurement: this is the last step
        if inner is not None:
            stats = dict(inner(t))
        else:
            totals = t.backward(t.batches.next())
            stats = {**totals.stats(), **t.optimizer_step()}
        if "loss" in stats:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", refresh=False)
        bar.update(1)
        return stats

    recipe.max_steps = max(cap, min_steps, trainer.step + 1)  # until the first plan
    recipe.log_every = 1  # the first steps are logged one by one; then about LOG_POINTS records in all
    bar = tqdm(total=None, initial=trainer.step, unit="step", desc=desc, disable=quiet,  # total: once planned
               dynamic_ncols=True)
    quiet_before = trainer.quiet
    trainer.quiet, trainer.step_fn = True, step
    try:
        result = trainer.fit()
    finally:
        trainer.quiet, trainer.step_fn = quiet_before, inner
        bar.close()
    plan.steps = result.step
    plan.wall_s = time.time() - start
    if chooser is not None:
        import torch

        torch.set_num_threads(chooser.current)
        plan.threads, plan.thread_switches = chooser.current, chooser.switches
    plan.stopped_by_deadline = result.step < cap
    if trainer.env.is_main:
        import yaml

        atomic_write_text(trainer.run_dir / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return result, plan
