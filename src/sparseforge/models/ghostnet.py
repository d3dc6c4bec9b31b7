"""GhostNet (Han et al. 2020, arXiv:1911.11907): half of each layer's features from cheap depthwise ops, by concat.

The baseline RepGhost (``repghost.py``) replaces: a Ghost module computes ``ceil(oup / 2)`` channels with a 1x1
primary conv and as many again with a depthwise "cheap operation" on them, and *concatenates* the two halves,
where RepGhost adds them and folds the addition away. Kept here so that claim ("faster than concat-based Ghost at
the same FLOPs") can be measured on the same runtimes. Module names follow the official code
(huawei-noah/Efficient-AI-Backbones ``ghostnet_pytorch``: ``primary_conv``, ``cheap_operation``, ``ghost1``/
``ghost2``, ``conv_dw``/``bn_dw``, ``se``, ``shortcut``, ``conv_stem``, ``blocks``, ``conv_head``, ``classifier``);
written from the paper and that code's structure.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn


def make_divisible(v: float, divisor: int = 4, min_value: int | None = None) -> int:
    new_v = max(min_value or divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


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


class ConvBnAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostModule(nn.Module):
    """1x1 primary conv -> ``init = ceil(oup / ratio)`` channels; depthwise cheap op -> ``init * (ratio - 1)``
    more; the output is their concatenation (trimmed to ``oup`` when ratio does not divide it)."""

    def __init__(self, inp: int, oup: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3, stride: int = 1,
                 relu: bool = True):
        super().__init__()
        self.oup = oup
        init = math.ceil(oup / ratio)
        new = init * (ratio - 1)
        self.trim = init + new != oup
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init, new, dw_size, 1, dw_size // 2, groups=init, bias=False),
            nn.BatchNorm2d(new),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, : self.oup] if self.trim else out


class GhostBottleneck(nn.Module):
    """Ghost module (expansion, ReLU) -> depthwise stride-2 conv + BN when downsampling -> optional SE -> Ghost
    module (linear) + shortcut (identity, or depthwise + BN + 1x1 + BN when the shape changes). ``module(inp, oup,
    relu)`` builds the two feature modules: concat-based Ghost modules here, RepGhost's foldable ones there."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.0, module: Callable[[int, int, bool], nn.Module] | None = None):
        super().__init__()
        module = module or (lambda i, o, relu: GhostModule(i, o, relu=relu))
        self.stride = stride
        self.ghost1 = module(in_chs, mid_chs, True)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2,
                                     groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se = SqueezeExcite(mid_chs, se_ratio) if se_ratio else None
        self.ghost2 = module(mid_chs, out_chs, False)
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


# k, expansion, out, se ratio, stride (per stage): the paper's Table 1
CFGS = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
    [[5, 120, 40, 0.25, 1]],
    [[3, 240, 80, 0, 2]],
    [[3, 200, 80, 0, 1], [3, 184, 80, 0, 1], [3, 184, 80, 0, 1], [3, 480, 112, 0.25, 1], [3, 672, 112, 0.25, 1]],
    [[5, 672, 160, 0.25, 2]],
    [[5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1], [5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1]],
]


class GhostStyleNet(nn.Module):
    """The GhostNet skeleton both networks share: stem, stages of bottlenecks from ``cfgs`` (k, expansion, out, SE
    ratio, stride), a 1x1 conv to ``head_mult`` x the last expansion, global pool, ``conv_head`` to 1280, classifier.
    ``input_size`` 224: the ImageNet network (stride-2 stem, 32x downsampling). 32 (CIFAR): the same blocks with a
    stride-1 stem and the first downsampling stage at stride 1 (8x in all), so a 32x32 image ends at 4x4."""

    def __init__(self, cfgs: list, block: Callable[..., nn.Module], head_mult: int, num_classes: int, width: float,
                 dropout: float, input_size: int):
        super().__init__()
        if input_size not in (32, 224):
            raise ValueError(f"{type(self).__name__} input_size must be 32 (CIFAR stem) or 224, got {input_size}")
        cifar = input_size == 32
        self.dropout = dropout
        c = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(3, c, 3, 1 if cifar else 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU(inplace=True)
        stages, cin, down = [], c, 0
        for cfg in cfgs:
            layers = []
            for k, exp, out, se, s in cfg:
                if s > 1:
                    down += 1
                    if cifar and down <= 1:
                        s = 1
                o, h = make_divisible(out * width, 4), make_divisible(exp * width, 4)
                layers.append(block(cin, h, o, k, s, se_ratio=se))
                cin = o
            stages.append(nn.Sequential(*layers))
        c = make_divisible(exp * width * head_mult, 4)
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


class GhostNet(GhostStyleNet):
    """GhostNet (1.0x at 224: 141 M multiply-adds, 5.2 M parameters); ``input_size=32``: the CIFAR stem."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2, input_size: int = 224):
        super().__init__(CFGS, GhostBottleneck, 1, num_classes, width, dropout, input_size)
