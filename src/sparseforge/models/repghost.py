"""RepGhostNet (Chen et al. 2022, arXiv:2211.06088): feature reuse by re-parameterization instead of concat.

Module names follow the official repository (ChengpengChen/RepGhost: ``primary_conv``, ``cheap_operation``,
``fusion_bn``, ``ghost1``/``ghost2``, ``conv_dw``/``bn_dw``, ``se.conv_reduce``/``conv_expand``, ``conv_stem``,
``blocks``, ``conv_head``, ``classifier``) so its released weights map by name. Written from the paper and the
official code's structure; the gate is hard-sigmoid (``relu6(x + 3) / 6``) as in GhostNet.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .reparam import fuse_bn, identity_kernel, pad_to, reparameterizable


def make_divisible(v: float, divisor: int = 4, min_value: int | None = None) -> int:
    new_v = max(min_value or divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


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


class SqueezeExcite(nn.Module):
    def __init__(self, in_chs: int, se_ratio: float = 0.25, divisor: int = 4):
        super().__init__()
        reduced = make_divisible(in_chs * se_ratio, divisor)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(in_chs, reduced, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, in_chs, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act1(self.conv_reduce(self.avg_pool(x))))
        return x * self.gate(s)


class RepGhostBottleneck(nn.Module):
    """Ghost module (expansion, ReLU) -> depthwise stride-2 conv + BN when downsampling -> optional SE -> ghost
    module (linear) + shortcut (identity, or depthwise + BN + 1x1 + BN when the shape changes)."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.0, reparam: bool = True):
        super().__init__()
        self.stride = stride
        self.ghost1 = RepGhostModule(in_chs, mid_chs, relu=True, reparam_bn=reparam)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2,
                                     groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se = SqueezeExcite(mid_chs, se_ratio) if se_ratio else None
        self.ghost2 = RepGhostModule(mid_chs, out_chs, relu=False, reparam_bn=reparam)
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost1(x)
        if self.stride > 1:
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)


class ConvBnAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


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


class RepGhostNet(nn.Module):
    """``input_size`` 224: the ImageNet network (stride-2 stem, 32x downsampling). 32 (CIFAR): the same blocks with
    a stride-1 stem and the first downsampling stage at stride 1 (8x in all), so a 32x32 image ends at 4x4."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2, input_size: int = 224,
                 reparam: bool = True):
        super().__init__()
        if input_size not in (32, 224):
            raise ValueError(f"RepGhostNet input_size must be 32 (CIFAR stem) or 224, got {input_size}")
        cifar = input_size == 32
        self.dropout = dropout
        c = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(3, c, 3, 1 if cifar else 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU(inplace=True)
        stages, cin, down = [], c, 0
        for cfg in CFGS:
            layers = []
            for k, exp, out, se, s in cfg:
                if s > 1:
                    down += 1
                    if cifar and down <= 1:
                        s = 1
                o, h = make_divisible(out * width, 4), make_divisible(exp * width, 4)
                layers.append(RepGhostBottleneck(cin, h, o, k, s, se_ratio=se, reparam=reparam))
                cin = o
            stages.append(nn.Sequential(*layers))
        c = make_divisible(exp * width * 2, 4)
        stages.append(nn.Sequential(ConvBnAct(cin, c, 1)))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.conv_head = nn.Conv2d(c, 1280, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = self.act2(self.conv_head(self.global_pool(x)))
        x = torch.flatten(x, 1)
        if self.dropout > 0.0:
            x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        return self.classifier(x)
