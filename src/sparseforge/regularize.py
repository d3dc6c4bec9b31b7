"""Training regularisers: R-Drop and the mixing family (Mixup, CutMix, HMix, GMix) with soft targets.

Every mixer takes ``(x, y, lam, ..., generator)``, pairs each image with a partner from one random
permutation of the batch (so batch size 1 and odd sizes work), handles H != W, and returns
``(mixed_x, soft_targets)``; ``y`` may be class indices (give ``num_classes``) or soft targets already.
The partner's label weight is the partner's actual share of the pixels (after clipping boxes to the image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import SparseforgeError


def soft_targets(y: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    if y.dim() == 2:
        return y.float()
    if num_classes is None:
        raise SparseforgeError("mixing class-index targets needs num_classes=... (or pass one-hot/soft targets)")
    return F.one_hot(y.long(), num_classes).float()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch mean of -sum(targets * log_softmax(logits))."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def _perm(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(n, generator=generator)


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _box(h: int, w: int, area: float, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """A box of (about) ``area`` of the image with the image's aspect ratio, uniform centre, clipped."""
    cut_h, cut_w = int(round(h * math.sqrt(area))), int(round(w * math.sqrt(area)))
    cy, cx = int(_uniform(generator) * h), int(_uniform(generator) * w)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    return y0, y1, x0, x1


def _check(x: torch.Tensor, lam: float) -> None:
    if x.dim() != 4:
        raise SparseforgeError(f"mixing needs an NCHW batch, got shape {tuple(x.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise SparseforgeError(f"lam must be in [0, 1], got {lam}")


def hmix(x: torch.Tensor, y: torch.Tensor, lam: float, ratio: float, generator: torch.Generator | None = None,
         num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HMix: paste a partner box of area ratio*(1-lam), blend the rest with weight lam_m so the partner's
    expected share stays 1-lam. ratio=0 is Mixup, ratio=1 is CutMix (for the same random draw)."""
    _check(x, lam)
    if not 0.0 <= ratio <= 1.0:
        raise SparseforgeError(f"HMix ratio must be in [0, 1], got {ratio}")
    n, _, h, w = x.shape
    perm = _perm(n, generator).to(x.device)     # drawn on the CPU: the same mix on every device
    yt = soft_targets(y, num_classes)
    xp, yp = x[perm], yt[perm]
    box_area = ratio * (1 - lam)
    rest_partner = (1 - lam) * (1 - ratio) / (1 - box_area) if box_area < 1 else 0.0   # partner share outside
    out = (1 - rest_partner) * x + rest_partner * xp
    a = 0.0
    if box_area > 0:
        y0, y1, x0, x1 = _box(h, w, box_area, generator)
        out[:, :, y0:y1, x0:x1] = xp[:, :, y0:y1, x0:x1]
        a = (y1 - y0) * (x1 - x0) / (h * w)
    share = a + (1 - a) * rest_partner
    return out, (1 - share) * yt + share * yp


def mixup(x, y, lam: float, generator: torch.Generator | None = None, num_classes: int | None = None):
    """Mixup: lam * x + (1 - lam) * partner, same for the targets."""
    return hmix(x, y, lam, 0.0, generator, num_classes)


def cutmix(x, y, lam: float, generator: torch.Generator | None = None, num_classes: int | None = None):
    """CutMix: paste a partner box of area 1 - lam; targets weighted by the actual (clipped) box area."""
    return hmix(x, y, lam, 1.0, generator, num_classes)


def gmix(x: torch.Tensor, y: torch.Tensor, lam: float, generator: torch.Generator | None = None,
         num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GMix: Gaussian mask M(p) = exp(-pi |p - c|^2 / ((1 - lam) H W)) around a uniform centre c;
    out = (1 - M) x + M partner; the partner's label weight is mean(M)."""
    _check(x, lam)
    n, _, h, w = x.shape
    perm = _perm(n, generator).to(x.device)     # drawn on the CPU: the same mix on every device
    yt = soft_targets(y, num_classes)
    cy, cx = _uniform(generator) * h, _uniform(generator) * w
    if lam >= 1:
        m = torch.zeros(h, w, dtype=x.dtype, device=x.device)
    else:
        yy = torch.arange(h, dtype=x.dtype, device=x.device)[:, None] + 0.5
        xx = torch.arange(w, dtype=x.dtype, device=x.device)[None, :] + 0.5
        m = torch.exp(-math.pi * ((yy - cy) ** 2 + (xx - cx) ** 2) / ((1 - lam) * h * w))
    out = (1 - m) * x + m * x[perm]
    share = float(m.mean())
    return out, (1 - share) * yt + share * yt[perm]


def rdrop_loss(logits1: torch.Tensor, logits2: torch.Tensor, targets: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """R-Drop: CE1 + CE2 + alpha/2 * (KL(P1||P2) + KL(P2||P1)), KL with batchmean."""
    l1, l2 = F.log_softmax(logits1, dim=1), F.log_softmax(logits2, dim=1)
    kl12 = F.kl_div(l2, l1, reduction="batchmean", log_target=True)    # KL(P1 || P2)
    kl21 = F.kl_div(l1, l2, reduction="batchmean", log_target=True)    # KL(P2 || P1)
    return F.cross_entropy(logits1, targets) + F.cross_entropy(logits2, targets) + alpha / 2 * (kl12 + kl21)


def has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


__all__ = ["hmix", "gmix", "mixup", "cutmix", "rdrop_loss", "soft_cross_entropy", "soft_targets", "has_dropout"]


# ---- training integration -------------------------------------------------------------------------------
import dataclasses  # noqa: E402
from typing import Literal  # noqa: E402

import numpy as np  # noqa: E402

from .config import Config, opt  # noqa: E402
from .train.loop import Callback  # noqa: E402


@dataclasses.dataclass(frozen=True)
class RDropConfig(Config):
    """R-Drop: two dropout passes per batch, CE on both plus symmetric KL."""

    epochs: int = opt(3, "recipe stage: epochs", min=1)
    alpha: float = opt(0.5, "weight of the symmetric KL term", min=0.0)


class RDropCallback(Callback):
    def __init__(self, cfg: RDropConfig):
        self.cfg = cfg

    def on_train_begin(self, trainer) -> None:
        if not has_dropout(trainer.model):
            trainer.log("warning: R-Drop on a model without dropout: both passes are identical, the KL term is 0 "
                        "and training costs twice as much; add dropout or use another regulariser")

    def on_loss(self, trainer, loss, logits, x, y):
        logits2 = trainer.model(x).float()      # the trainer's first pass is fp32 too (bf16 training)
        return rdrop_loss(logits, logits2, y, self.cfg.alpha)


@dataclasses.dataclass(frozen=True)
class MixConfig(Config):
    """Mixing regulariser on every training batch: lam ~ Beta(alpha, alpha)."""

    epochs: int = opt(3, "recipe stage: epochs", min=1)
    kind: Literal["mixup", "cutmix", "hmix", "gmix"] = opt("hmix", "mixing method")
    alpha: float = opt(1.0, "Beta(alpha, alpha) for lam", min=1e-3)
    ratio: float = opt(0.5, "HMix: box area ratio r (0 = Mixup, 1 = CutMix)", min=0.0, max=1.0)
    prob: float = opt(1.0, "probability of mixing a batch", min=0.0, max=1.0)


class MixCallback(Callback):
    def __init__(self, cfg: MixConfig, num_classes: int, seed: int = 0):
        self.cfg = cfg
        self.num_classes = num_classes
        self.seed = seed

    def on_batch(self, trainer, x, y):
        # per-step generator: the same batch mixes the same way after a resume
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.step)
        if float(torch.rand((), generator=g)) >= self.cfg.prob:
            return x, y
        lam = float(np.random.default_rng(self.seed * 1_000_003 + trainer.step).beta(self.cfg.alpha, self.cfg.alpha))
        return _MIXERS[self.cfg.kind](x, y, lam, self.cfg, g, self.num_classes)


_MIXERS = {
    "mixup": lambda x, y, lam, c, g, k: mixup(x, y, lam, g, k),
    "cutmix": lambda x, y, lam, c, g, k: cutmix(x, y, lam, g, k),
    "hmix": lambda x, y, lam, c, g, k: hmix(x, y, lam, c.ratio, g, k),
    "gmix": lambda x, y, lam, c, g, k: gmix(x, y, lam, g, k),
}

__all__ += ["RDropConfig", "RDropCallback", "MixConfig", "MixCallback"]
