"""Channel importance criteria: one small function each, scoring every channel (component) of a group.

A component's score aggregates all its slots: every filter producing it (a residual stream has several),
its BN channels, and -- for the group-lasso norm -- the input slices that consume it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..errors import SparseforgeError
from .graph import Group, Slot


def _rows(mods: dict[str, nn.Module], s: Slot) -> list[torch.Tensor]:
    """The parameter slices a slot owns."""
    m = mods[s.module]
    if s.role in ("out", "dw"):
        out = [m.weight[s.index]]
        if getattr(m, "bias", None) is not None:
            out.append(m.bias[s.index].reshape(1))
        return out
    if s.role == "in":
        return [m.weight[:, s.index]]
    if s.role == "bn":
        return [m.weight[s.index].reshape(1), m.bias[s.index].reshape(1)] if m.affine else []
    return []


def l1(mods, ch: list[Slot]) -> float:
    return float(sum(mods[s.module].weight[s.index].abs().sum() for s in ch if s.role == "out"))


def l2(mods, ch: list[Slot]) -> float:
    return float(torch.sqrt(sum((mods[s.module].weight[s.index] ** 2).sum() for s in ch if s.role == "out")))


def bn_scale(mods, ch: list[Slot]) -> float:
    """Network slimming: |gamma| of the channel's BatchNorm(s); L1 of the filters where there is no BN."""
    bns = [s for s in ch if s.role == "bn" and mods[s.module].affine]
    if not bns:
        return l1(mods, ch)
    return float(sum(mods[s.module].weight[s.index].abs() for s in bns))


def group_lasso(mods, ch: list[Slot]) -> float:
    """SSL's group norm: sqrt of the sum of squares of everything the channel owns (filters, BN, input slices)."""
    return float(torch.sqrt(sum((t.detach() ** 2).sum() for s in ch for t in _rows(mods, s))))


def taylor(mods, ch: list[Slot]) -> float:
    """First-order Taylor (Molchanov et al.): |sum of weight x gradient| over the channel's filters and BN."""
    total = 0.0
    for s in ch:
        if s.role not in ("out", "bn", "dw"):
            continue
        m = mods[s.module]
        if m.weight.grad is None:
            raise SparseforgeError("importance='taylor' needs gradients: run a backward pass on a few training "
                                   "batches before pruning (the 'structured' recipe stage does this)")
        total += float((m.weight[s.index] * m.weight.grad[s.index]).sum().abs())
    return total


IMPORTANCE: dict[str, Callable[[dict, list[Slot]], float]] = {
    "l1": l1, "l2": l2, "bn": bn_scale, "group_lasso": group_lasso, "taylor": taylor}


def score_groups(model: nn.Module, gs: list[Group], criterion: str) -> list[torch.Tensor]:
    if criterion not in IMPORTANCE:
        raise SparseforgeError(f"unknown importance {criterion!r}; use one of {', '.join(IMPORTANCE)}")
    fn = IMPORTANCE[criterion]
    mods = dict(model.named_modules())
    with torch.no_grad():
        return [torch.tensor([fn(mods, ch) for ch in g.channels], dtype=torch.float64) for g in gs]
