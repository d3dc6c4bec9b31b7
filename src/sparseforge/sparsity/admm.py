"""Extended ADMM for pattern + connectivity pruning (PatDNN), as a training callback.

    minimise  loss(W) + rho/2 ||W - Z + U||_F^2 + rho/2 ||W - Y + V||_F^2     (squared norms)
    every update: Z = P_pattern(W + U), Y = P_connectivity(W + V), U += W - Z, V += W - Y, rho *= factor
                  (U, V are scaled duals, so they are rescaled by rho_old / rho_new when rho grows)

Z lives in the pattern set (every kernel one library pattern), Y in the
connectivity set (a fixed number of kernels per layer). After the ADMM epochs
the stage hard-prunes W with both projections and masked retraining follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import Config, opt
from ..train.loop import Callback
from .pattern import PatternConfig, _connectivity_counts, ensure_library, layer_choices
from .patterns import connectivity_mask_k, pattern_mask
from .scope import CONNECTIVITY, PATTERN, PATTERN_ONLY


@dataclass(frozen=True)
class ADMMConfig(Config):
    """ADMM training towards a pattern + connectivity target (then hard prune, then masked retraining)."""

    rho: float = opt(1e-3, "initial penalty weight", min=0.0)
    rho_factor: float = opt(1.3, "rho *= rho_factor after each update (1 = constant)", min=1.0)
    rho_max: float = opt(1.0, "upper bound for rho", min=0.0)
    epochs: int = opt(6, "ADMM training epochs", min=1)
    update_every: int = opt(0, "steps between Z/Y/U/V updates (0 = once per epoch)", min=0)
    target: PatternConfig = opt(help="the sparsity ADMM drives towards (and the hard prune applies)", factory=PatternConfig)


class ADMMCallback(Callback):
    name = "admm"

    def __init__(self, cfg: ADMMConfig):
        self.cfg = cfg
        self.rho = cfg.rho
        self.updates = 0
        self.Z: dict[str, torch.Tensor] = {}
        self.Y: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.V: dict[str, torch.Tensor] = {}
        self.keep: dict[str, int] = {}
        self.residuals: list[dict[str, float]] = []
        self._modules: dict[str, nn.Module] = {}
        self._library: torch.Tensor | None = None
        self._pattern_names: set[str] = set()

    # ---- setup ----------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        t = self.cfg.target
        choices = layer_choices(model, t)
        self._library = ensure_library(model, t, choices)
        self._modules = {c.name: c.module for c in choices if c.role in (PATTERN, PATTERN_ONLY, CONNECTIVITY)}
        self._pattern_names = {c.name for c in choices if c.role in (PATTERN, PATTERN_ONLY)}
        conn = [c for c in choices if c.role in (PATTERN, CONNECTIVITY)]
        self._library = self._library.cpu()     # masks are chosen on the CPU, whatever device trains
        if not self.keep:
            pm = {c.name: pattern_mask(c.module.weight.detach().cpu(), self._library, t.channel_block)
                  for c in choices if c.role in (PATTERN, PATTERN_ONLY)}
            self.keep = _connectivity_counts(t, conn, pm)
        for d in (self.Z, self.Y, self.U, self.V):      # restored from a checkpoint (CPU): to the weights' device
            for name in d:
                d[name] = d[name].to(self._modules[name].weight.device)
        if not self.Z and not self.Y:
            with torch.no_grad():
                for name, m in self._modules.items():
                    w = m.weight.detach().clone()
                    if name in self._pattern_names:
                        self.Z[name] = self.project_pattern(w)
                        self.U[name] = torch.zeros_like(w)
                    if name in self.keep:
                        self.Y[name] = self.project_connectivity(name, w)
                        self.V[name] = torch.zeros_like(w)

    # the projections choose their masks on the CPU (a no-op when training there), once per ADMM update
    def project_pattern(self, x: torch.Tensor) -> torch.Tensor:
        return x * pattern_mask(x.cpu(), self._library, self.cfg.target.channel_block).to(x.device)

    def project_connectivity(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x * connectivity_mask_k(x.cpu(), self.keep[name], self.cfg.target.channel_block).to(x.device)

    def penalty(self) -> torch.Tensor:
        """rho/2 * sum ||W - Z + U||^2 + rho/2 * sum ||W - Y + V||^2 (squared Frobenius norms)."""
        total = None
        for name, m in self._modules.items():
            w = m.weight
            terms = []
            if name in self.Z:
                terms.append((w - self.Z[name] + self.U[name]).pow(2).sum())
            if name in self.Y:
                terms.append((w - self.Y[name] + self.V[name]).pow(2).sum())
            for t in terms:
                total = t if total is None else total + t
        if total is None:
            return torch.zeros(())
        return 0.5 * self.rho * total

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        rz = ry = wn = 0.0
        for name, m in self._modules.items():
            w = m.weight.detach()
            wn += float(w.pow(2).sum())
            if name in self.Z:
                self.Z[name] = self.project_pattern(w + self.U[name])
                self.U[name] += w - self.Z[name]
                rz += float((w - self.Z[name]).pow(2).sum())
            if name in self.Y:
                self.Y[name] = self.project_connectivity(name, w + self.V[name])
                self.V[name] += w - self.Y[name]
                ry += float((w - self.Y[name]).pow(2).sum())
        self.updates += 1
        rec = {"update": self.updates, "rho": self.rho, "residual_pattern": (rz / max(wn, 1e-30)) ** 0.5,
               "residual_connectivity": (ry / max(wn, 1e-30)) ** 0.5}
        self.residuals.append(rec)
        new_rho = min(self.rho * self.cfg.rho_factor, self.cfg.rho_max)
        if new_rho != self.rho:
            # U, V are *scaled* duals (lambda / rho): keep lambda fixed when rho changes (Boyd et al. 3.4.1),
            # otherwise every rho increase silently inflates the dual and the penalty overshoots.
            scale = self.rho / new_rho
            for d in (self.U, self.V):
                for name in d:
                    d[name].mul_(scale)
            self.rho = new_rho
        return rec

    # ---- callback hooks ---------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        self.setup(trainer.model)

    def on_loss(self, trainer, loss, logits, x, y):
        return loss + self.penalty()

    def on_step_end(self, trainer) -> None:
        every = self.cfg.update_every or trainer.steps_per_epoch
        if trainer.step % every == 0:
            rec = self.update()
            trainer.log(f"admm update {rec['update']}: rho {rec['rho']:.3g}  "
                        f"|W-Z|/|W| {rec['residual_pattern']:.4f}  |W-Y|/|W| {rec['residual_connectivity']:.4f}")

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "updates": self.updates, "keep": dict(self.keep), "residuals": self.residuals,
                "Z": self.Z, "Y": self.Y, "U": self.U, "V": self.V}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.rho, self.updates = state["rho"], state["updates"]
        self.keep = dict(state["keep"])
        self.residuals = list(state["residuals"])
        for k in ("Z", "Y", "U", "V"):
            setattr(self, k, {n: t.clone() for n, t in state[k].items()})
