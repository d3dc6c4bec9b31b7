"""Learning-rate schedules as pure functions of the global step.

Stateless schedules make resuming exact: the LR at step s is recomputed from s,
so there is no scheduler state to save, restore or get out of sync.
"""

from __future__ import annotations

import math


def lr_factor(kind: str, step: int, total_steps: int, *, warmup_steps: int = 0,
              milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1,
              onecycle_pct: float = 0.15, final_div: float = 1e4, onecycle_div: float = 25.0) -> float:
    """Multiplier of the base LR at ``step`` (0-based) out of ``total_steps``."""
    total = max(1, total_steps)
    s = min(step, total)
    if kind == "onecycle":
        # Smith's one-cycle: cosine up from base/div to base over pct, then cosine down to base/(div*final_div).
        up = max(1, int(onecycle_pct * total))
        lo = 1.0 / onecycle_div
        if s < up:
            return lo + (1 - lo) * (1 - math.cos(math.pi * s / up)) / 2
        end = lo / final_div
        p = (s - up) / max(1, total - up)
        return end + (1 - end) * (1 + math.cos(math.pi * p)) / 2
    if warmup_steps > 0 and s < warmup_steps:
        return (s + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        p = (s - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    if kind == "step":
        f = 1.0
        for m in milestones:
            if s >= m * total:
                f *= gamma
        return f
    raise ValueError(f"unknown schedule {kind!r}")
