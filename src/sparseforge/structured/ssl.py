"""SSL (Wen et al. 2016) group lasso and early-bird tickets (You et al. 2020), as training callbacks.

Both act on gradients after ``backward`` (no extra autograd graph): the group-lasso subgradient
lambda_g * w_g / ||w_g|| and network slimming's lambda * sign(gamma).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import Config, ConfigError, opt
from ..train.loop import Callback
from .graph import DependencyGraph
from .importance import score_groups
from .surgery import remove_channels

GROUP_TYPES = ("filter", "channel", "shape", "depth")


@dataclass(frozen=True)
class GroupLassoConfig(Config):
    """Structured sparsity learning: sum of group L2 norms (square root of sums of squares) as a penalty."""

    lambda_g: float = opt(1e-4, "weight of the group-lasso term", min=0.0)
    groups: tuple[str, ...] = opt(("filter", "channel"), "group types: filter, channel, shape, depth")
    threshold: float = opt(1e-3, "after training, groups whose norm is below this are removed", min=0.0)
    epochs: int = opt(3, "recipe stage: epochs of regularised training before removal", min=1)
    proximal: bool = opt(False, "proximal steps (group soft-thresholding after every optimizer step, reaching exact "
                                "zeros) instead of the subgradient of the SSL paper")

    def validate(self) -> None:
        bad = [g for g in self.groups if g not in GROUP_TYPES]
        if bad:
            raise ConfigError(f"GroupLassoConfig.groups: unknown {bad}; use any of {', '.join(GROUP_TYPES)}")


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    return convs[1:]        # the first conv sees the image: left alone, as in SSL


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "remove_branch") and hasattr(m, "conv1") and getattr(m, "branch_removable", True)
            and not getattr(m, "branch_removed", False)]       # SSL's depth groups: conv1 + conv2 of a basic block


def group_norms(model: nn.Module, cfg: GroupLassoConfig) -> dict[str, torch.Tensor]:
    """Every group's L2 norm, by group type (filter norms of all layers concatenated, etc.)."""
    out: dict[str, list[torch.Tensor]] = {g: [] for g in cfg.groups}
    with torch.no_grad():
        for _, m in _convs(model):
            w = m.weight
            if "filter" in out:
                out["filter"].append(w.flatten(1).norm(dim=1))
            if "channel" in out:
                out["channel"].append(w.transpose(0, 1).flatten(1).norm(dim=1))
            if "shape" in out:
                out["shape"].append(w.flatten(1).norm(dim=0))
        if "depth" in out:
            for _, b in _blocks(model):
                out["depth"].append(torch.sqrt(sum((p ** 2).sum() for p in (b.conv1.weight, b.conv2.weight))).reshape(1))
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


class GroupLassoCallback(Callback):
    """Adds the group-lasso subgradient to the conv gradients every step; logs group norms every epoch."""

    def __init__(self, cfg: GroupLassoConfig):
        self.cfg = cfg
        self.history: list[dict[str, float]] = []

    def on_step_end(self, trainer) -> None:
        if not self.cfg.proximal or self.cfg.lambda_g == 0:
            return
        t = self.cfg.lambda_g * trainer.optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            for _, m in _convs(trainer.model):
                w = m.weight
                if "filter" in self.cfg.groups:
                    w.mul_((1 - t / w.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp_min(0)[:, None, None, None])
                if "channel" in self.cfg.groups:
                    w.mul_((1 - t / w.transpose(0, 1).flatten(1).norm(dim=1).clamp_min(1e-12)).clamp_min(0)
                           [None, :, None, None])
                if "shape" in self.cfg.groups:
                    w.mul_((1 - t / w.norm(dim=0, keepdim=True).clamp_min(1e-12)).clamp_min(0))
            if "depth" in self.cfg.groups:
                for _, b in _blocks(trainer.model):
                    ws = [b.conv1.weight, b.conv2.weight]
                    n = torch.sqrt(sum((p ** 2).sum() for p in ws)).clamp_min(1e-12)
                    for p in ws:
                        p.mul_((1 - t / n).clamp_min(0))

    def on_after_backward(self, trainer) -> None:
        lam = self.cfg.lambda_g
        if lam == 0 or self.cfg.proximal:
            return
        eps = 1e-12
        with torch.no_grad():
            for _, m in _convs(trainer.model):
                w, g = m.weight, m.weight.grad
                if g is None:
                    continue
                if "filter" in self.cfg.groups:
                    g.add_(lam * w / w.flatten(1).norm(dim=1).clamp_min(eps)[:, None, None, None])
                if "channel" in self.cfg.groups:
                    g.add_(lam * w / w.transpose(0, 1).flatten(1).norm(dim=1).clamp_min(eps)[None, :, None, None])
                if "shape" in self.cfg.groups:
                    g.add_(lam * w / w.norm(dim=0, keepdim=True).clamp_min(eps))
            if "depth" in self.cfg.groups:
                for _, b in _blocks(trainer.model):
                    ws = [b.conv1.weight, b.conv2.weight]
                    norm = torch.sqrt(sum((p ** 2).sum() for p in ws)).clamp_min(eps)
                    for p in ws:
                        if p.grad is not None:
                            p.grad.add_(lam * p / norm)

    def on_train_begin(self, trainer) -> None:
        if not self.history:           # epoch 0: the norms before any regularised step (the plot's start)
            self._record(trainer, -1)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        self._record(trainer, epoch)

    def _record(self, trainer, epoch: int) -> None:
        norms = group_norms(trainer.model, self.cfg)
        rec = {"epoch": epoch + 1}
        for k, v in norms.items():
            if v.numel():
                rec[f"{k}_mean"] = float(v.mean())
                rec[f"{k}_below_threshold"] = float((v < self.cfg.threshold).float().mean())
        self.history.append(rec)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))


def ssl_remove(model: nn.Module, cfg: GroupLassoConfig, example_input: torch.Tensor) -> nn.Module:
    """Remove what the group lasso drove to zero: residual branches (depth) and channels whose producing
    filters' joint L2 norm is below ``threshold``; returns the physically smaller model (fine-tune it next:
    a removed channel's BatchNorm shift was a constant the next layer no longer sees)."""
    import copy

    model = copy.deepcopy(model)
    if "depth" in cfg.groups:
        for _, b in _blocks(model):
            n = torch.sqrt(sum((p.detach() ** 2).sum() for p in (b.conv1.weight, b.conv2.weight)))
            if float(n) < cfg.threshold:
                b.remove_branch()
    dg = DependencyGraph(model, example_input)
    gs = dg.groups()
    scores = score_groups(model, gs, "l2")
    removed: set[int] = set()
    for g, s in zip(gs, scores):
        if g.blocked:
            continue
        gone = [g.roots[c] for c in range(len(g)) if float(s[c]) < cfg.threshold]
        if len(gone) == len(g):
            gone = gone[1:]          # keep at least one channel per group
        removed.update(gone)
    out = remove_channels(model, dg, removed) if removed else model
    if hasattr(model, "sf_spec"):
        from .surgery import arch_of

        out.sf_spec = dict(model.sf_spec, arch=arch_of(out))
    return out


# ---- early-bird tickets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EarlyBirdConfig(Config):
    """Draw the ticket when the global BN-scale channel mask stops changing (You et al., ICLR'20)."""

    ratio: float = opt(0.3, "fraction of channels the ticket prunes (global |gamma| ranking)", min=0.0, max=1.0)
    lambda_bn: float = opt(1e-4, "L1 penalty on BatchNorm scales during the search", min=0.0)
    epsilon: float = opt(0.1, "draw when the normalised Hamming distance to each recent mask is <= this", min=0.0)
    window: int = opt(5, "masks compared: the newest against the previous window-1", min=2)
    stop_on_draw: bool = opt(True, "end the search stage when the ticket is drawn")
    epochs: int = opt(20, "recipe stage: most epochs to search before slimming anyway", min=1)


def bn_channel_mask(model: nn.Module, ratio: float) -> torch.Tensor:
    """Global 0/1 mask over every BN channel: the ``ratio`` smallest |gamma| are 0."""
    g = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    mask = torch.ones_like(g)
    k = int(round(ratio * g.numel()))
    if k:
        mask[torch.argsort(g, stable=True)[:k]] = 0
    return mask.cpu()        # on the CPU whatever device trains: compared with masks restored from a checkpoint


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised Hamming distance between two 0/1 masks."""
    if a.shape != b.shape:
        raise ConfigError("early-bird masks must have the same size (the model changed during the search)")
    return int((a != b).sum()) / a.numel()   # exact: a distance of exactly epsilon must compare equal


def early_bird_drawn(masks: list[torch.Tensor], epsilon: float, window: int) -> bool:
    """True when there are ``window`` masks and the newest is within ``epsilon`` of each of the others."""
    if len(masks) < window:
        return False
    recent = masks[-window:]
    return max(mask_distance(recent[-1], m) for m in recent[:-1]) <= epsilon


class EarlyBirdCallback(Callback):
    def __init__(self, cfg: EarlyBirdConfig):
        self.cfg = cfg
        self.masks: list[torch.Tensor] = []
        self.distances: list[float] = []
        self.drawn_epoch: int | None = None

    def on_after_backward(self, trainer) -> None:
        if self.cfg.lambda_bn == 0:
            return
        with torch.no_grad():
            for m in trainer.model.modules():
                if isinstance(m, nn.BatchNorm2d) and m.weight.grad is not None:
                    m.weight.grad.add_(self.cfg.lambda_bn * torch.sign(m.weight))

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        if self.drawn_epoch is not None:
            return
        self.masks.append(bn_channel_mask(trainer.model, self.cfg.ratio))
        self.masks = self.masks[-self.cfg.window:]
        if len(self.masks) >= 2:
            self.distances.append(mask_distance(self.masks[-1], self.masks[-2]))
        if early_bird_drawn(self.masks, self.cfg.epsilon, self.cfg.window):
            self.drawn_epoch = epoch + 1
            trainer.log(f"early-bird ticket drawn at epoch {epoch + 1}")
            if self.cfg.stop_on_draw:
                trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"masks": [m.tolist() for m in self.masks], "distances": self.distances, "drawn_epoch": self.drawn_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = [torch.tensor(m) for m in state.get("masks", [])]
        self.distances = list(state.get("distances", []))
        self.drawn_epoch = state.get("drawn_epoch")
