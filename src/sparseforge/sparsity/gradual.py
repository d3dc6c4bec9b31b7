"""Gradual pruning during training: the masks tighten on the cubic schedule of Zhu & Gupta (2017).

    sparsity(t) = s_f * (1 - (1 - t / T)^3)        for t <= T = ramp * (the stage's steps), then s_f

Why: a one-shot cut to 8x (or ADMM's penalty ramp) knocks a small network far down and spends much of a fixed
budget recovering; removing weights a little at a time lets training route around each cut while the network
still has most of its capacity. For the pattern target the 4-of-9 patterns are applied at the first update (a
2.25x cut that costs little) and the *connectivity* (kernels kept per layer, or across layers with the global
scope) follows the schedule; for the magnitude target the global unstructured sparsity follows it, so the two
structures can be compared with the same pipeline and budget. Masks only ever shrink.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..config import Config, opt
from ..train.loop import Callback
from .magnitude import MagnitudeConfig, prune_magnitude
from .mask import mask_optimizer_state
from .pattern import PatternConfig, prune_pattern
from .patterns import parse_ratio


@dataclass(frozen=True)
class GradualConfig(Config):
    """Prune while training (cubic schedule), towards a pattern + connectivity target or a magnitude sparsity."""

    epochs: int = opt(10, "recipe stage: training epochs, the schedule included", min=1)
    target: PatternConfig = opt(help="pattern + connectivity target (ignored when magnitude > 0)", factory=PatternConfig)
    magnitude: float = opt(0.0, "> 0: global unstructured magnitude pruning to this sparsity instead", min=0.0, max=1.0)
    ramp: float = opt(0.5, "share of the stage's steps over which the sparsity rises to the target", min=0.01, max=1.0)
    update_every: int = opt(50, "optimizer steps between mask updates", min=1)
    teacher: str = opt("start", "KD teacher during the stage (as KDConfig.teacher); '' = the labels only")
    T: float = opt(5.0, "KD temperature", min=1e-3)
    alpha: float = opt(0.9, "KD weight (1 - alpha on cross-entropy)", min=0.0, max=1.0)


def schedule_fraction(step: int, ramp_steps: int) -> float:
    """Share of the final sparsity in force after ``step`` optimizer steps (1.0 from ramp_steps on)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return 1.0
    return 1.0 - (1.0 - step / ramp_steps) ** 3


def apply_fraction(model: nn.Module, cfg: GradualConfig, frac: float) -> dict[str, float]:
    """Masks at ``frac`` of the way to the target (never growing any existing mask)."""
    if cfg.magnitude > 0:
        s = cfg.magnitude * frac
        prune_magnitude(model, MagnitudeConfig(sparsity=s, scope="global"))
        return {"sparsity": s}
    keep_final = parse_ratio(cfg.target.connectivity)
    keep = 1.0 - (1.0 - keep_final) * frac
    per_layer = {k: 1.0 - (1.0 - parse_ratio(v)) * frac for k, v in cfg.target.connectivity_per_layer.items()}
    prune_pattern(model, dataclasses.replace(cfg.target, connectivity=keep, connectivity_per_layer=per_layer))
    return {"kernel_keep": keep}


class GradualCallback(Callback):
    name = "gradual"

    def __init__(self, cfg: GradualConfig):
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []

    def _ramp_steps(self, trainer) -> int:
        return max(1, int(self.cfg.ramp * trainer.total_steps))

    def on_train_begin(self, trainer) -> None:
        if trainer.step == 0:          # the first cut (patterns; connectivity and magnitude start at 0)
            self._update(trainer, 0)

    def on_step_end(self, trainer) -> None:
        ramp = self._ramp_steps(trainer)
        if trainer.step <= ramp and (trainer.step % self.cfg.update_every == 0 or trainer.step == ramp):
            self._update(trainer, trainer.step)

    def on_train_end(self, trainer) -> None:
        if not self.history or self.history[-1]["fraction"] < 1.0:
            self._update(trainer, self._ramp_steps(trainer))

    def _update(self, trainer, step: int) -> None:
        frac = schedule_fraction(step, self._ramp_steps(trainer))
        info = apply_fraction(trainer.model, self.cfg, frac)
        mask_optimizer_state(trainer.model, trainer.optimizer)
        self.history.append({"step": step, "fraction": round(frac, 6), **info})

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
