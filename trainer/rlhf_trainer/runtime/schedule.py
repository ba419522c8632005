"""Learning-rate schedule: linear warmup, then constant, linear or cosine decay."""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["constant", "linear", "cosine"]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, kind: ScheduleKind) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps, so the first step already learns and step warmup - 1 runs at
    the peak. Decay over the remaining steps with progress p = (step - warmup) / (total - warmup):
    constant 1, linear 1 - p, cosine (1 + cos(pi * p)) / 2. The last step still has p < 1, so no
    step is spent at a zero learning rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
