"""Learning-rate schedules: linear warm-up then cosine (the paper's), linear, or constant decay to a floor.

Stateless: the rate is a function of the optimiser step, so the schedule's state is just the step number.
"""

from __future__ import annotations

import math

from .config import OptimConfig


def warmup_steps(optim: OptimConfig, max_steps: int) -> int:
    """max(warmup_steps, ceil(warmup_ratio * max_steps))."""
    return max(optim.warmup_steps, math.ceil(optim.warmup_ratio * max_steps))


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate for optimiser step `step` (0-based; step 0 is the first update).

    Warm-up: lr * (step + 1) / warmup for the first `warmup` steps. Then, over the remaining steps, cosine (or
    linear) decay from lr to min_lr_ratio * lr, reached at the last step; constant keeps lr.
    """
    peak = optim.lr
    warm = warmup_steps(optim, max_steps)
    if step < warm:
        return peak * (step + 1) / warm
    if optim.schedule == "constant":
        return peak
    floor = peak * optim.min_lr_ratio
    decay_steps = max_steps - warm
    if decay_steps <= 1:
        return floor if step >= max_steps - 1 else peak
    progress = min(1.0, (step - warm) / (decay_steps - 1))
    if optim.schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
