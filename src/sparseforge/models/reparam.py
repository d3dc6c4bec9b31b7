"""Structural re-parameterization: blocks that train with parallel linear branches and fold into one conv.

Why a registry: folding is a property of a block type (its branches are linear up to the activation), so each
re-parameterizable block registers its own ``fold()`` returning its inference form, and ``reparameterize``
walks any model and folds every registered block it finds -- RepGhost's fusion branch, RepVGG's 3x3 + 1x1 +
identity, and whatever block a user registers next -- without knowing the model.

Prune after folding: the folded kernel is the one the engine runs, so patterns and connectivity are chosen on
it; pruning the train-time branches separately would not give a pattern-sparse folded kernel (a 1x1 branch
adds to every kernel's centre, an identity branch to the diagonal kernels').
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Registry

REPARAMETERIZABLE: Registry[type] = Registry("re-parameterizable block")


def reparameterizable(cls: type) -> type:
    """Class decorator: ``cls`` has ``fold() -> nn.Module`` giving its inference form (same outputs in eval)."""
    if not callable(getattr(cls, "fold", None)):
        raise TypeError(f"{cls.__name__} must define fold() to be re-parameterizable")
    return REPARAMETERIZABLE.register(cls.__name__, cls)


def fuse_bn(weight: torch.Tensor | None, bias: torch.Tensor | None, bn: nn.BatchNorm2d | None,
            channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of conv-then-BN in eval mode. ``weight`` None: an identity branch (a BN on the input)."""
    if bn is None:
        return weight, bias if bias is not None else torch.zeros(weight.shape[0])
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    b = bias if bias is not None else torch.zeros_like(std)
    return weight * scale.view(-1, 1, 1, 1), beta + (b - bn.running_mean) * scale


def identity_kernel(channels: int, in_per_group: int, k: int) -> torch.Tensor:
    """The k x k kernel of the identity map (grouped: ``in_per_group`` inputs per output channel)."""
    w = torch.zeros(channels, in_per_group, k, k)
    for c in range(channels):
        w[c, c % in_per_group, k // 2, k // 2] = 1.0
    return w


def pad_to(kernel: torch.Tensor, k: int) -> torch.Tensor:
    p = (k - kernel.shape[-1]) // 2
    return F.pad(kernel, (p, p, p, p))


def reparameterize(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Fold every registered re-parameterizable block of ``model`` into its inference form (in place by default,
    else on a copy) and return the model. BatchNorm statistics are read as they are: call in eval mode after
    training (the folded model is put in eval mode)."""
    import copy

    m = model if inplace else copy.deepcopy(model)
    kinds = tuple(cls for _, cls in REPARAMETERIZABLE.items())
    with torch.no_grad():
        if isinstance(m, kinds):
            return m.fold().eval()
        folded = _fold_children(m, kinds)
    if folded and getattr(m, "sf_spec", None) is not None:
        # saved weights then say they are the folded form, and load_model rebuilds that form
        m.sf_spec = {**m.sf_spec, "reparameterized": True}
    return m.eval()


def _fold_children(parent: nn.Module, kinds: tuple) -> int:
    """Fold every block of ``kinds`` below ``parent`` in place; returns how many."""
    n = 0
    for name, child in list(parent.named_children()):
        if isinstance(child, kinds):
            setattr(parent, name, child.fold())
            n += 1
        else:
            n += _fold_children(child, kinds)
    return n


def count_foldable(model: nn.Module) -> int:
    kinds = tuple(cls for _, cls in REPARAMETERIZABLE.items())
    return sum(isinstance(m, kinds) for m in model.modules())


@reparameterizable
class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al. 2021): 3x3 conv+BN + 1x1 conv+BN (+ BN identity when shapes allow), ReLU after the sum;
    folds to one 3x3 conv with bias + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, act: Callable | None = None):
        super().__init__()
        self.conv3 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 1, stride, 0, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.bn_id = nn.BatchNorm2d(out_ch) if in_ch == out_ch and stride == 1 else None
        self.act = act() if act is not None else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        if self.bn_id is not None:
            y = y + self.bn_id(x)
        return self.act(y)

    def fold(self) -> nn.Module:
        c = self.conv3
        w, b = fuse_bn(c.weight, None, self.bn3, c.out_channels)
        w1, b1 = fuse_bn(self.conv1.weight, None, self.bn1, c.out_channels)
        w, b = w + pad_to(w1, 3), b + b1
        if self.bn_id is not None:
            wi, bi = fuse_bn(identity_kernel(c.out_channels, c.in_channels // c.groups, 3), None, self.bn_id,
                             c.out_channels)
            w, b = w + wi, b + bi
        conv = nn.Conv2d(c.in_channels, c.out_channels, 3, c.stride, 1, groups=c.groups, bias=True)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        return nn.Sequential(conv, self.act)
