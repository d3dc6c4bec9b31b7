"""RepGhostNet (Chen et al. 2022, arXiv:2211.06088): feature reuse by re-parameterization instead of concat.

Module names follow the official repository (ChengpengChen/RepGhost: ``primary_conv``, ``cheap_operation``,
``fusion_bn``, ``ghost1``/``ghost2``, ``conv_dw``/``bn_dw``, ``se.conv_reduce``/``conv_expand``, ``conv_stem``,
``blocks``, ``conv_head``, ``classifier``) so its released weights map by name. Written from the paper and the
official code's structure; the gate is hard-sigmoid (``relu6(x + 3) / 6``) as in GhostNet.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .ghostnet import GhostBottleneck, GhostStyleNet
from .reparam import fuse_bn, identity_kernel, pad_to, reparameterizable


@reparameterizable
class RepGhostModule(nn.Module):
    """1x1 primary conv (+BN, +ReLU) -> depthwise ``dw_size`` cheap conv + BN, *plus* a BN of its input (the
    fusion branch); ReLU after the sum. Folds to primary conv -> one depthwise conv with bias -> ReLU."""

    def __init__(self, inp: int, oup: int, kernel_size: int = 1, dw_size: int = 3, stride: int = 1,
                 relu: bool = True, reparam_bn: bool = True):
        super().__init__()
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        self.fusion_conv = nn.Sequential(nn.Identity()) if reparam_bn else nn.Sequential()
        self.fusion_bn = nn.Sequential(nn.BatchNorm2d(oup)) if reparam_bn else nn.Sequential()
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(oup, oup, dw_size, 1, dw_size // 2, groups=oup, bias=False),
            nn.BatchNorm2d(oup),
        )
        self.relu = nn.ReLU(inplace=False) if relu else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            x2 = x2 + bn(conv(x1))
        return self.relu(x2)

    def fold(self) -> nn.Module:
        dw, bn = self.cheap_operation[0], self.cheap_operation[1]
        c, k = dw.out_channels, dw.kernel_size[0]
        w, b = fuse_bn(dw.weight, None, bn, c)
        for fbn in self.fusion_bn:
            wi, bi = fuse_bn(identity_kernel(c, 1, 1), None, fbn, c)
            w, b = w + pad_to(wi, k), b + bi
        conv = nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=True)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        return _FoldedGhost(self.primary_conv, conv, self.relu)


class _FoldedGhost(nn.Module):
    """A RepGhost module in its inference form (the official repo's ``deploy=True`` layout)."""

    def __init__(self, primary_conv: nn.Module, cheap_operation: nn.Conv2d, relu: nn.Module):
        super().__init__()
        self.primary_conv = primary_conv
        self.cheap_operation = cheap_operation
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.cheap_operation(self.primary_conv(x)))


class RepGhostBottleneck(GhostBottleneck):
    """GhostNet's bottleneck with RepGhost modules: ghost module (expansion, ReLU) -> depthwise stride-2 conv + BN
    when downsampling -> optional SE -> ghost module (no ReLU) + shortcut (identity, or depthwise + BN + 1x1 + BN
    when the shape changes)."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.0, reparam: bool = True):
        super().__init__(in_chs, mid_chs, out_chs, dw_kernel_size, stride, se_ratio,
                         module=lambda i, o, relu: RepGhostModule(i, o, relu=relu, reparam_bn=reparam))


# k, expansion, out, se ratio, stride (per stage): the official RepGhostNet table
CFGS = [
    [[3, 8, 16, 0, 1]],
    [[3, 24, 24, 0, 2]],
    [[3, 36, 24, 0, 1]],
    [[5, 36, 40, 0.25, 2]],
    [[5, 60, 40, 0.25, 1]],
    [[3, 120, 80, 0, 2]],
    [[3, 100, 80, 0, 1], [3, 120, 80, 0, 1], [3, 120, 80, 0, 1], [3, 240, 112, 0.25, 1], [3, 336, 112, 0.25, 1]],
    [[5, 336, 160, 0.25, 2]],
    [[5, 480, 160, 0, 1], [5, 480, 160, 0.25, 1], [5, 480, 160, 0, 1], [5, 480, 160, 0.25, 1]],
]


class RepGhostNet(GhostStyleNet):
    """``input_size`` 224: the ImageNet network (1.0x: 142 M multiply-adds, 4.1 M parameters folded). 32 (CIFAR):
    the CIFAR stem (``GhostStyleNet``). The head conv is twice the last expansion, as in the official code."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2, input_size: int = 224,
                 reparam: bool = True):
        super().__init__(CFGS, lambda *args, **kw: RepGhostBottleneck(*args, reparam=reparam, **kw), 2, num_classes,
                         width, dropout, input_size)
