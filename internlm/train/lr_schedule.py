"""Learning-rate and Adam beta2 schedules (InternLM's warm-up + cosine, and its beta2 rule).

Both are pure functions of the step inside the current phase, so resuming needs no scheduler state
beyond the step counter that every checkpoint records.
"""

from __future__ import annotations

import math


def warmup_cosine_lr(
    step: int, total_steps: int, peak_lr: float, warmup_ratio: float, eta_min: float, init_steps: int = 0
) -> float:
    """Learning rate for the update with 0-based index `step` inside a phase.

    Linear warm-up from peak_lr / warmup_steps to peak_lr over ``warmup_steps = round(warmup_ratio *
    total_steps)`` updates, then cosine decay from peak_lr to eta_min at the last update.
    ``init_steps`` (InternLM) shifts the schedule, as if that many updates had already happened.
    """
    step = step + init_steps
    warmup_steps = int(round(warmup_ratio * total_steps))
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return eta_min + (peak_lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def beta2_at(update: int, init_beta2: float, c: float) -> float:
    """InternLM's beta2 schedule: ``max(init_beta2, 1 - update ** -c)`` when c > 0, else init_beta2.

    `update` counts optimizer updates from 1. With c > 0 beta2 grows towards 1 as training goes on.
    """
    if c <= 0:
        return init_beta2
    return max(init_beta2, 1.0 - 1.0 / (max(update, 1) ** c))
