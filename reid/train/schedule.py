"""Learning-rate schedule: linear warm-up, then step decay or cosine annealing.

A pure function of training progress (epochs as a float), so resuming needs no scheduler
object: the factor at a given step is recomputed from the epoch and step numbers.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from reid.errors import InputError

SCHEDULES = ("cosine", "step", "constant")


def lr_factor(
    progress: float,
    *,
    epochs: int,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    warmup_factor: float = 0.01,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_factor: float = 0.01,
) -> float:
    """Multiplier of the base learning rate at ``progress`` epochs (0 <= progress <= epochs)."""
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; expected one of: {', '.join(SCHEDULES)}")
    if warmup_epochs > 0 and progress < warmup_epochs:
        return warmup_factor + (1.0 - warmup_factor) * progress / warmup_epochs
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** bisect.bisect_right(sorted(milestones), progress)
    span = max(epochs - warmup_epochs, 1e-9)
    t = min(max((progress - warmup_epochs) / span, 0.0), 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
