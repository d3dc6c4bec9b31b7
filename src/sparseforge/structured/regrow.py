"""Growing regularisation (Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021).

Pruning a trained network at once removes channels that still carry signal; the accuracy drop then has to be
won back by fine-tuning. Instead the channels chosen for removal get an L2 penalty ``lam * ||w||^2 / 2`` whose
coefficient grows from 0 to ``reg_max`` during the first half of the regularisation phase and then holds, so
the rest of the network learns to do without them while they fade; removing them afterwards costs almost
nothing. Only producers are penalised (filters, biases, BN scale and shift): a channel whose producers are zero
is zero everywhere, whatever its consumers hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..train.loop import Callback
from .graph import DependencyGraph
from .prune import CostModel, StructuredConfig, select_step
from .surgery import producer_slices


def plan_removal(model: nn.Module, cfg: StructuredConfig, example_input: torch.Tensor) -> tuple[DependencyGraph, set[int]]:
    """The dependency graph and the channel components (root ids) ``cfg`` removes, chosen now."""
    dg = DependencyGraph(model, example_input)
    base = CostModel(dg).cost(np.array([], dtype=np.int64))
    return dg, select_step(model, dg, cfg, 1, base)


class GrowingRegCallback(Callback):
    """Adds ``lam(t) * w`` to the gradient of every producer of a channel chosen for removal."""

    name = "growing_reg"

    def __init__(self, slices: list[tuple[nn.Parameter, torch.Tensor]], reg_max: float, ramp: float = 0.5):
        self.slices = slices
        self.reg_max = float(reg_max)
        self.ramp = float(ramp)          # share of the phase's steps over which lam rises to reg_max
        self.step = 0
        self.total = 1
        self.history: list[dict[str, float]] = []

    def lam(self) -> float:
        ramp_steps = max(1.0, self.ramp * self.total)
        return self.reg_max * min(1.0, self.step / ramp_steps)

    def norms(self, model: nn.Module) -> tuple[float, float]:
        """RMS of the penalised entries and of every other entry of the same parameters."""
        pen = other = 0.0
        npen = noth = 0
        seen = {}
        for p, idx in self.slices:
            sel = torch.zeros(p.shape[0], dtype=torch.bool)
            sel[idx] = True
            seen.setdefault(id(p), (p, torch.zeros(p.shape[0], dtype=torch.bool)))[1].logical_or_(sel)
        with torch.no_grad():
            for p, sel in seen.values():
                q = p.detach().reshape(p.shape[0], -1).float()
                sel = sel.to(q.device)
                pen += float((q[sel] ** 2).sum())
                npen += int(q[sel].numel())
                other += float((q[~sel] ** 2).sum())
                noth += int(q[~sel].numel())
        return (pen / max(npen, 1)) ** 0.5, (other / max(noth, 1)) ** 0.5

    def on_train_begin(self, trainer) -> None:
        self.total = trainer.total_steps
        if not self.history:
            self._record(trainer, -1)

    def on_after_backward(self, trainer) -> None:
        lam = self.lam()
        if lam == 0:
            return
        with torch.no_grad():
            for p, idx in self.slices:
                if p.grad is not None:
                    p.grad[idx] += lam * p[idx]

    def on_step_end(self, trainer) -> None:
        self.step += 1

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        self._record(trainer, epoch)

    def _record(self, trainer, epoch: int) -> None:
        pen, other = self.norms(trainer.model)
        self.history.append({"epoch": epoch + 1, "lambda": self.lam(), "removed_rms": pen, "kept_rms": other})

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.history = list(state.get("history", []))


def growing_reg(model: nn.Module, cfg: StructuredConfig, example_input: torch.Tensor
                ) -> tuple[GrowingRegCallback, DependencyGraph, set[int]]:
    """Choose the channels now; return the callback to train with, and what to hand to ``remove_channels``."""
    dg, rem = plan_removal(model, cfg, example_input)
    return GrowingRegCallback(producer_slices(model, dg, rem), cfg.reg_max), dg, rem
