"""``StructuredConfig``: choose channels by importance, meet a MAC or parameter target, remove them physically.

Scheduling is separate from scoring: a target ratio is reached in ``steps`` equal steps, each re-tracing
and re-scoring the already smaller network. Within a step the channels to remove are found by bisection on
how many of the (normalised) lowest-scoring channels go, with MACs / parameters counted analytically from
the dependency graph, so the target is met to within one ``round_to`` step per group.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from ..config import Config, ConfigError, opt
from ..errors import SparseforgeError
from ..models.cifar_resnet import PadShortcut
from .graph import DependencyGraph, Group
from .importance import score_groups
from .surgery import remove_channels


@dataclass(frozen=True)
class StructuredConfig(Config):
    """Remove whole channels/filters (dependency-aware) until the model has ``mac_ratio`` of its MACs
    (or ``param_ratio`` of its parameters, or ``ratio`` fewer channels per group); the result is a smaller
    dense network."""

    importance: Literal["l1", "l2", "bn", "group_lasso", "taylor"] = opt("l1", "channel importance criterion")
    mac_ratio: float = opt(0.0, "target: pruned MACs / original MACs (e.g. 0.5); 0 = not used", min=0.0, max=1.0)
    param_ratio: float = opt(0.0, "target: pruned parameters / original parameters; 0 = not used", min=0.0, max=1.0)
    ratio: float = opt(0.0, "target: fraction of channels removed from every prunable group; 0 = not used",
                       min=0.0, max=1.0)
    scope: Literal["global", "layer"] = opt("global", "global: one ranking over all groups (scores normalised by "
                                                      "each group's mean); layer: the same fraction in every group")
    steps: int = opt(1, "reach the target in this many equal steps, re-scoring in between", min=1)
    ignored_layers: tuple[str, ...] = opt((), "layers (globs) whose output channels are never removed")
    # default 1, measured (bench/structured_round_to.py, ResNet-20/56 at mac_ratio 0.5, PyTorch, 2 threads, Zen 4):
    # rounding widths to 8 or 16 was never faster at batch 32 (ResNet-56 1.71-1.78x vs dense at 1, 1.26-1.49x
    # at 8, 1.16-1.26x at 16) and it moves MACs away from the layers the ranking chose; batch 1 was within noise
    round_to: int = opt(1, "keep channel counts multiples of this (1 measured fastest in PyTorch; 4/8 for a "
                           "runtime that pads channels to SIMD blocks)", min=1)
    max_group_ratio: float = opt(0.9, "never remove more than this fraction of one group", min=0.0, max=1.0)
    normalize: bool = opt(True, "global scope: divide scores by each group's mean before ranking (False = raw "
                                "scores, as network slimming ranks |gamma|)")
    regularize_epochs: int = opt(0, "recipe stage: train this many epochs with a growing L2 penalty on the chosen "
                                    "channels before removing them (growing regularisation); 0 = remove at once",
                                 min=0)
    reg_max: float = opt(1.0, "growing regularisation: the penalty coefficient reached halfway through", min=0.0)

    def validate(self) -> None:
        given = [n for n in ("mac_ratio", "param_ratio", "ratio") if getattr(self, n) > 0]
        if len(given) != 1:
            raise ConfigError("StructuredConfig needs exactly one target: mac_ratio, param_ratio or ratio "
                              f"(got {', '.join(given) or 'none'}); e.g. StructuredConfig(mac_ratio=0.5)")
        if self.regularize_epochs and self.steps > 1:
            raise ConfigError("StructuredConfig: regularize_epochs chooses the channels once; use steps=1 with it")


class CostModel:
    """MACs and parameters of the network as a function of which channel components are removed."""

    def __init__(self, dg: DependencyGraph):
        self.terms = []        # (out roots or None, in roots or None, per-pair cost for MACs, per-pair params, fixed)
        for name, n in dg.node_of.items():
            m = dg.modules[name]
            src = n.args[0]
            if isinstance(m, nn.Conv2d):
                tm = n.meta["tensor_meta"]
                hw = int(np.prod(tm.shape[2:]))
                k = int(np.prod(m.kernel_size))
                ro = np.array(dg.roots_of(n))
                if m.groups == 1:
                    ri = np.array(dg.roots_of(src))
                    self.terms.append((ro, ri, k * hw, k, ro if m.bias is not None else None))
                else:
                    self.terms.append((ro, None, k * hw, k, ro if m.bias is not None else None))
            elif isinstance(m, nn.Linear):
                ro, ri = np.array(dg.roots_of(n)), np.array(dg.roots_of(src))
                self.terms.append((ro, ri, 1, 1, ro if m.bias is not None else None))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                ro = np.array(dg.roots_of(n))
                self.terms.append((None, None, 0, 0, np.concatenate([ro, ro]) if m.affine else None))   # gamma, beta

    def cost(self, removed: np.ndarray) -> tuple[float, float]:
        macs = params = 0.0
        for ro, ri, mac_per, par_per, extra in self.terms:
            if ro is not None:
                no = float((~np.isin(ro, removed)).sum())
                ni = float((~np.isin(ri, removed)).sum()) if ri is not None else 1.0
                macs += no * ni * mac_per
                params += no * ni * par_per
            if extra is not None:
                params += float((~np.isin(extra, removed)).sum())
        return macs, params


def _round_keep(n_total: int, n_remove: int, round_to: int, max_ratio: float) -> int:
    """How many to remove so that the kept count is a multiple of round_to (rounding the kept count up)."""
    cap = int(math.floor(n_total * max_ratio))
    n_remove = min(n_remove, cap)
    keep = n_total - n_remove
    if round_to > 1:
        keep = min(n_total, int(math.ceil(keep / round_to) * round_to))
        while n_total - keep > cap:
            keep += round_to
        keep = min(keep, n_total)
    return n_total - keep


def select(gs: list[Group], scores: list[torch.Tensor], cfg: StructuredConfig, cost: CostModel,
           target: tuple[str, float], base: tuple[float, float]) -> set[int]:
    """Root ids to remove so the cost reaches ``target`` (kind, ratio of ``base``)."""
    prunable = [(g, s) for g, s in zip(gs, scores) if not g.blocked and len(g) > 1]
    kind, ratio = target
    if kind == "ratio" and cfg.scope == "layer":
        return _per_group(prunable, lambda g: int(round(len(g) * ratio)), cfg)

    def removal(t: float) -> set[int]:
        if cfg.scope == "layer":
            return _per_group(prunable, lambda g: int(round(len(g) * t)), cfg)
        # global: normalise each group's scores by its mean, rank everything, cut at fraction t of channels
        allv = []
        for gi, (g, s) in enumerate(prunable):
            ns = (s / s.mean().clamp_min(1e-12) if cfg.normalize else s).tolist()
            allv += [(v, gi, c) for c, v in enumerate(ns)]
        allv.sort()
        n_cut = int(round(t * len(allv)))
        per = [0] * len(prunable)
        for _, gi, _c in allv[:n_cut]:
            per[gi] += 1
        return _per_group(prunable, lambda g, per=per, idx={id(g): i for i, (g, _) in enumerate(prunable)}:
                          per[idx[id(g)]], cfg)

    if kind == "ratio":
        return removal(ratio)

    def value(rem: set[int]) -> float:
        m, p = cost.cost(np.array(sorted(rem), dtype=np.int64))
        return (m / base[0]) if kind == "mac" else (p / base[1])

    lo, hi = 0.0, 1.0
    best = removal(hi)
    if value(best) > ratio:
        return best            # cannot reach it within max_group_ratio: the caller reports what was reached
    for _ in range(30):
        mid = (lo + hi) / 2
        if value(removal(mid)) <= ratio:
            hi = mid
        else:
            lo = mid
    rem = removal(hi)
    return _give_back(prunable, rem, value, ratio, cfg) if cfg.round_to > 1 else rem


def _give_back(prunable, rem: set[int], value, ratio: float, cfg: StructuredConfig) -> set[int]:
    """With ``round_to`` > 1 every group moves in whole steps, so one cut for all groups overshoots the target;
    hand back one step at a time (the group whose removed channels score highest first) while the target holds."""
    rem = set(rem)
    while True:
        best = None
        for g, s in prunable:
            gone = [c for c in range(len(g)) if g.roots[c] in rem]
            if len(gone) < cfg.round_to:
                continue
            back = sorted(gone, key=lambda c: -float(s[c]))[: cfg.round_to]
            cand = rem - {g.roots[c] for c in back}
            if value(cand) <= ratio:
                sc = float(s[back].mean() / s.mean().clamp_min(1e-12))
                if best is None or sc > best[0]:
                    best = (sc, cand)
        if best is None:
            return rem
        rem = best[1]


def _per_group(prunable, count, cfg: StructuredConfig) -> set[int]:
    out: set[int] = set()
    for g, s in prunable:
        n = _round_keep(len(g), count(g), cfg.round_to, cfg.max_group_ratio)
        if n <= 0:
            continue
        order = torch.argsort(s, stable=True)[:n].tolist()
        out.update(g.roots[c] for c in order)
    return out


def prune_structured(model: nn.Module, cfg: StructuredConfig, example_input: torch.Tensor | None = None,
                     **_) -> nn.Module:
    """Returns a new, physically smaller model (the input model is left unchanged)."""
    if example_input is None:
        raise SparseforgeError("structured pruning traces the model: pass example_input=torch.randn(1, 3, 32, 32) "
                               "(any batch of the right shape)")
    if cfg.regularize_epochs:
        warnings.warn("StructuredConfig.regularize_epochs needs training: prune() removes the channels at once. "
                      "Use a recipe 'structured' stage, or structured.growing_reg() with a Trainer", stacklevel=3)
    dg0 = DependencyGraph(model, example_input)
    base = CostModel(dg0).cost(np.array([], dtype=np.int64))
    cur = model
    for step in range(1, cfg.steps + 1):
        dg = dg0 if step == 1 else DependencyGraph(cur, example_input)
        rem = select_step(cur, dg, cfg, step, base)
        cur = remove_channels(cur, dg, rem)
    return cur


def select_step(model: nn.Module, dg: DependencyGraph, cfg: StructuredConfig, step: int,
                base: tuple[float, float]) -> set[int]:
    """The channel components (root ids of ``dg``) step ``step`` of ``cfg.steps`` removes."""
    kind, final = (("mac", cfg.mac_ratio) if cfg.mac_ratio else ("param", cfg.param_ratio) if cfg.param_ratio
                   else ("ratio", cfg.ratio))
    gs = dg.groups(cfg.ignored_layers)
    scores = score_groups(model, gs, cfg.importance)
    if kind == "ratio":
        target = ("ratio", 1 - (1 - final) ** (1 / cfg.steps))    # geometric: the same share of what is left
    else:
        target = (kind, 1 - (1 - final) * step / cfg.steps)
    return select(gs, scores, cfg, CostModel(dg), target, base)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, int]:
    """Multiply-accumulates of one image through each conv and linear layer (measured by forward hooks, so any
    input size and any architecture counts right); the one MAC counter the structured methods share."""
    macs: dict[nn.Module, int] = {}

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            macs[m] = macs.get(m, 0) + out[0].numel() * (m.in_channels // m.groups) * int(np.prod(m.kernel_size))
        else:
            macs[m] = macs.get(m, 0) + m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was = model.training
    model.eval()         # no BatchNorm statistics change while counting
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was)
        for h in hs:
            h.remove()
    return macs


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one image through the conv and linear layers."""
    return sum(layer_macs(model, example_input).values())


__all__ = ["StructuredConfig", "prune_structured", "count_macs", "layer_macs", "count_params", "CostModel", "PadShortcut"]
