"""Random layers and small blocks for fuzzing the compiler against PyTorch (used by tests and bench/)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..sparsity.patterns import all_candidates


@dataclasses.dataclass(frozen=True)
class Case:
    cin: int
    cout: int
    h: int
    w: int
    k: int
    stride: int
    pad: int
    bias: bool
    bn: bool
    act: str            # none | relu | relu6
    residual: bool      # add the block input (needs matching shapes)
    depthwise: bool
    second: bool        # a second conv (3x3 s1 p1) after the first, its output added to the first's
    sparsity: str       # dense | pattern | kernels | empty_filters | zero
    batch: int
    seed: int
    # an inverted-residual block instead: 1x1 expand (cin -> cout) -> 3x3 depthwise s1 -> 1x1 project (-> cin),
    # BN + act after the first two, BN (+ the input if ``residual``) after the last; k/stride/pad/depthwise/
    # second are ignored. Small maps run as one fused op (engine.plan.BlockPlan).
    inverted: bool = False


class Block(nn.Module):
    def __init__(self, c: Case):
        super().__init__()
        self.inverted = c.inverted
        if c.inverted:
            bn = (lambda n: nn.BatchNorm2d(n)) if c.bn else (lambda n: nn.Identity())
            act = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6}[c.act]
            self.conv = nn.Conv2d(c.cin, c.cout, 1, bias=c.bias)
            self.body = nn.Sequential(bn(c.cout), act(), nn.Conv2d(c.cout, c.cout, 3, 1, 1, groups=c.cout, bias=c.bias),
                                      bn(c.cout), act(), nn.Conv2d(c.cout, c.cin, 1, bias=c.bias), bn(c.cin))
            self.residual = c.residual
            return
        cout = c.cin if c.depthwise else c.cout
        self.conv = nn.Conv2d(c.cin, cout, c.k, c.stride, c.pad, bias=c.bias, groups=c.cin if c.depthwise else 1)
        self.bn = nn.BatchNorm2d(cout) if c.bn else nn.Identity()
        self.act = {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6()}[c.act]
        self.residual = c.residual
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False) if c.second else None

    def forward(self, x):
        if self.inverted:
            y = self.body(self.conv(x))
            return y + x if self.residual else y
        y = self.bn(self.conv(x))
        if self.residual:
            y = y + x
        y = self.act(y)
        if self.conv2 is not None:
            y = torch.relu(self.conv2(y) + y)
        return y


def valid(c: Case) -> bool:
    if c.inverted:
        return True
    if c.k == 1 and c.pad != 0:
        return False
    if c.h + 2 * c.pad < c.k or c.w + 2 * c.pad < c.k:
        return False
    cout = c.cin if c.depthwise else c.cout
    ho = (c.h + 2 * c.pad - c.k) // c.stride + 1
    wo = (c.w + 2 * c.pad - c.k) // c.stride + 1
    if c.residual and (cout != c.cin or ho != c.h or wo != c.w):
        return False
    if c.depthwise and c.k != 3:
        return False
    return True


def build_case(c: Case) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(c.seed)
    m = Block(c)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
                mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=g))
        convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)] if c.inverted else [m.conv]
        for conv in convs:
            _sparsify(conv.weight, c, g)
    m.eval()
    x = torch.randn(c.batch, c.cin, c.h, c.w, generator=g)
    return m, x


def _sparsify(w: torch.Tensor, c: Case, g: torch.Generator) -> None:
    o, i = w.shape[:2]
    if c.sparsity == "pattern" and w.shape[-1] == 3:
        cands = all_candidates()
        pick = cands[torch.randint(0, 56, (o, i), generator=g)].reshape(o, i, 3, 3)
        keep = (torch.rand(o, i, 1, 1, generator=g) < 0.4).float()
        w.mul_(pick * keep)
    elif c.sparsity == "kernels":
        w.mul_((torch.rand(o, i, 1, 1, generator=g) < 0.3).float())
    elif c.sparsity == "empty_filters":
        w.mul_((torch.rand(o, 1, 1, 1, generator=g) < 0.5).float())
    elif c.sparsity == "zero":
        w.zero_()
