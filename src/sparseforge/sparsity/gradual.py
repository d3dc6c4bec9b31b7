"""Gradual pruning during training: the masks tighten on the cubic schedule of Zhu & Gupta (2017).

    sparsity(t) = s_f * (1 - (1 - t / T)^3)        for t <= T = ramp * (the stage's steps), then s_f

Why: a one-shot cut to 8x (or ADMM's penalty ramp) knocks a small network far down and spends much of a fixed
budget recovering; removing weights a little at a time lets training route around each cut while the network
still has most of its capacity. For the pattern target the 4-of-9 patterns are applied at the first update (a
2.25x cut that costs little) and the *connectivity* (kernels kept per layer, or across layers with the global
scope) follows the schedule; for the magnitude target the global unstructured sparsity follows it, so the two
structures can be compared with the same pipeline and budget. Masks only ever shrink.

``pattern_ramp=True`` ramps the taps as well: each kernel starts with all 9 and keeps its best-fit library
pattern plus its largest other taps, 5 extra at the start falling to 0 on the same schedule, so the pattern cut
is as gradual as the magnitude target's (which starts dense) instead of a 2.25x cut at step 0.

``regrow=True`` trains dense shadow weights through the ramp instead (the straight-through estimator with the
sparse-refined decay of SR-STE, Zhou et al. 2021): the forward sees the masked weights, the gradient updates every
weight, and the masks are recomputed from the shadow at each update, so a pruned weight can come back and a
kernel can change its pattern while the cut deepens. Why: a mask chosen from the pretrained weights is frozen in
by hard pruning, and the fixed-shape structures (4-of-9 patterns, whole kernels) lose more to that early choice
than unstructured pruning does. At the end of the ramp the masks are frozen and masked training goes on.
Measured at 8x on ResNet-20 it diverges (loss up every epoch, see the guide): it is an option, not the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import Config, opt
from ..errors import ConfigError
from ..train.loop import Callback
from .magnitude import MagnitudeConfig, prune_magnitude
from ..masks import MASK_BUFFER, masked_modules
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
    pattern_ramp: bool = opt(False, "pattern target: taps fall 9 -> 4 on the schedule too (best-fit pattern + the "
                                    "largest other taps), instead of the patterns' 2.25x cut at step 0")
    regrow: bool = opt(False, "dense shadow weights through the ramp (straight-through): masks are recomputed, "
                              "pruned weights can return; frozen at the ramp's end")
    regrow_decay: float = opt(2e-4, "regrow: SR-STE decay pulling the currently pruned shadow weights to 0", min=0.0)

    def validate(self) -> None:
        if self.pattern_ramp and self.magnitude > 0:
            raise ConfigError("GradualConfig.pattern_ramp ramps the pattern target's taps; with magnitude > 0 there "
                              "are no patterns: set magnitude = 0 or drop pattern_ramp")


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
    one = cfg.target.connectivity_1x1
    keep_1x1 = None if one is None else 1.0 - (1.0 - parse_ratio(one)) * frac
    extra = round(5 * (1.0 - frac)) if cfg.pattern_ramp else 0
    prune_pattern(model, dataclasses.replace(cfg.target, connectivity=keep, connectivity_1x1=keep_1x1,
                                             connectivity_per_layer=per_layer),
                  extra_taps=extra)
    return {"kernel_keep": keep, **({"extra_taps": extra} if cfg.pattern_ramp else {})}


class GradualCallback(Callback):
    name = "gradual"

    def __init__(self, cfg: GradualConfig):
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []
        # regrow: dense weights and the masks in force, per module name, while the ramp runs (empty after it)
        self.shadow: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self._mods: tuple[int, dict[str, nn.Module]] = (0, {})

    def _ramp_steps(self, trainer) -> int:
        return max(1, int(self.cfg.ramp * trainer.total_steps))

    def on_train_begin(self, trainer) -> None:
        if trainer.step == 0:          # the first cut (patterns; connectivity and magnitude start at 0)
            self._update(trainer, 0)

    def on_after_backward(self, trainer) -> None:
        # straight-through: the gradient taken at the masked weights updates the dense ones (the mask callback,
        # which runs after this, only zeroes gradients under masks that existed before the stage)
        if not self.shadow:
            return
        mods = self._modules(trainer.model)
        with torch.no_grad():
            for name, dense in self.shadow.items():
                w = mods[name].weight
                w.copy_(dense)
                if w.grad is not None and self.cfg.regrow_decay > 0:
                    w.grad.add_(dense * (1 - self.masks[name]), alpha=self.cfg.regrow_decay)

    def on_step_end(self, trainer) -> None:
        if self.shadow:
            mods = self._modules(trainer.model)
            with torch.no_grad():
                for name, dense in self.shadow.items():
                    dense.copy_(mods[name].weight)
        ramp = self._ramp_steps(trainer)
        if trainer.step <= ramp and (trainer.step % self.cfg.update_every == 0 or trainer.step == ramp):
            self._update(trainer, trainer.step)
        elif self.shadow:
            self._show_masked(trainer.model)

    def on_train_end(self, trainer) -> None:
        if not self.history or self.history[-1]["fraction"] < 1.0:
            self._update(trainer, self._ramp_steps(trainer))

    def _update(self, trainer, step: int) -> None:
        frac = schedule_fraction(step, self._ramp_steps(trainer))
        if self.cfg.regrow and frac < 1.0:
            info = self._regrow_update(trainer.model, frac)
        else:
            if self.shadow:            # the ramp's end: the last masks are computed from the dense weights, frozen
                self._restore_dense(trainer.model)
                self.shadow, self.masks = {}, {}
            info = apply_fraction(trainer.model, self.cfg, frac)
            mask_optimizer_state(trainer.model, trainer.optimizer)
        self.history.append({"step": step, "fraction": round(frac, 6), **info})

    # ---- regrow (straight-through) -------------------------------------
    def _regrow_update(self, model: nn.Module, frac: float) -> dict[str, float]:
        """New masks from the dense weights; the model keeps the masks it had before the stage (if any) as its
        buffers, and holds the dense weights times the new masks between steps (what evaluation and checkpoints
        see)."""
        before = {n: getattr(m, MASK_BUFFER).clone() for n, m in masked_modules(model)}
        mods = self._modules(model)
        if self.shadow:
            self._restore_dense(model)
            first = {}
        else:                       # the first update: the shadow starts from the weights before any cut
            first = {n: m.weight.detach().clone() for n, m in mods.items()
                     if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2}
        info = apply_fraction(model, self.cfg, frac)
        new = {n: getattr(m, MASK_BUFFER).clone() for n, m in masked_modules(model)}
        changed = sum(int((self.masks[n] != new[n].to(self.masks[n].dtype)).sum()) for n in new if n in self.masks)
        with torch.no_grad():
            for n, mask in new.items():
                if n not in self.shadow:
                    self.shadow[n] = first[n] if n in first else mods[n].weight.detach().clone()
                self.masks[n] = mask.to(self.shadow[n].dtype)
                if n in before:
                    getattr(mods[n], MASK_BUFFER).copy_(before[n])
                else:
                    del mods[n]._buffers[MASK_BUFFER]
        self._show_masked(model)
        return {**info, "regrow_changed": changed}

    def _modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules by name, looked up once per model (every training step reads them)."""
        if self._mods[0] != id(model):
            self._mods = (id(model), dict(model.named_modules()))
        return self._mods[1]

    def _restore_dense(self, model: nn.Module) -> None:
        mods = self._modules(model)
        with torch.no_grad():
            for n, dense in self.shadow.items():
                mods[n].weight.copy_(dense)

    def _show_masked(self, model: nn.Module) -> None:
        mods = self._modules(model)
        with torch.no_grad():
            for n, dense in self.shadow.items():
                mods[n].weight.copy_(dense * self.masks[n])

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "shadow": dict(self.shadow), "masks": dict(self.masks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.shadow = {k: v.clone() for k, v in dict(state.get("shadow", {})).items()}
        self.masks = {k: v.clone() for k, v in dict(state.get("masks", {})).items()}
