"""Unstructured magnitude pruning (global or per layer): the comparison arm for pattern pruning."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from ..config import Config, opt
from .mask import attach_mask, get_mask
from .scope import first_conv_name, matches


@dataclass(frozen=True)
class MagnitudeConfig(Config):
    """Remove the smallest-magnitude weights until ``sparsity`` of the pruned layers' weights are zero."""

    sparsity: float = opt(0.5, "fraction of weights in the pruned layers that end up zero", min=0.0, max=1.0)
    scope: Literal["global", "layer"] = opt("global", "global: one threshold over all pruned layers; layer: same sparsity in each")
    include: tuple[str, ...] = opt((), "only layers whose module name matches one of these globs (empty = all convs)")
    exclude: tuple[str, ...] = opt((), "layers (globs) left dense")
    prune_first_conv: bool = opt(False, "also prune the first conv")
    prune_linear: bool = opt(False, "also prune Linear layers (the classifier)")


def _layers(model: nn.Module, cfg: MagnitudeConfig) -> list[nn.Module]:
    first = first_conv_name(model)
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or (isinstance(m, nn.Linear) and not cfg.prune_linear):
            continue
        if (cfg.include and not matches(name, cfg.include)) or (cfg.exclude and matches(name, cfg.exclude)):
            continue
        if name == first and not cfg.prune_first_conv:
            continue
        out.append(m)
    return out


def _keep_top(scores: torch.Tensor, n_zero: int) -> torch.Tensor:
    """0/1 mask keeping all but the ``n_zero`` lowest scores (exact count; ties by index)."""
    keep = torch.ones(scores.numel())
    if n_zero > 0:
        order = torch.argsort(scores.flatten(), stable=True)[:n_zero]
        keep[order] = 0
    return keep.reshape(scores.shape)


def prune_magnitude(model: nn.Module, cfg: MagnitudeConfig, **_) -> nn.Module:
    """Already-pruned weights score -1, so they are removed first and masks only shrink."""
    mods = _layers(model, cfg)

    def score(m: nn.Module) -> torch.Tensor:
        s = m.weight.detach().abs().float()
        old = get_mask(m)
        return torch.where(old.tensor > 0, s, torch.full_like(s, -1.0)) if old is not None else s

    if cfg.scope == "global" and mods:
        scores = [score(m) for m in mods]
        flat = torch.cat([s.flatten() for s in scores])
        keep = _keep_top(flat, int(math.floor(cfg.sparsity * flat.numel() + 0.5)))
        off = 0
        for m, s in zip(mods, scores):
            attach_mask(m, keep[off:off + s.numel()].reshape(s.shape))
            off += s.numel()
    else:
        for m in mods:
            s = score(m)
            attach_mask(m, _keep_top(s, int(math.floor(cfg.sparsity * s.numel() + 0.5))))
    return model
