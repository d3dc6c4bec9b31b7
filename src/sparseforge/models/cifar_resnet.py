"""CIFAR ResNets (He et al. 2016, sec. 4.2) with option-A (parameter-free) shortcuts.

Module names match the widely used akamaster checkpoints (``conv1``, ``bn1``,
``layer{1,2,3}.{j}.conv1|bn1|conv2|bn2``, ``linear``) so those weights load
strictly. The option-A shortcut is a real module (:class:`PadShortcut`), not
a lambda, so it traces with torch.fx and the compiler and structured pruning
can recognise it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad channels ``pad`` on each side."""

    def __init__(self, stride: int, pad_before: int, pad_after: int):
        super().__init__()
        self.stride = stride
        self.pad_before = pad_before
        self.pad_after = pad_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            extra = planes - in_planes
            # He et al.: pad planes//4 on each side when the width doubles (16 -> 8+16+8).
            self.shortcut = PadShortcut(stride, extra // 2, extra - extra // 2)
        else:
            self.shortcut = nn.Identity()

    branch_removed = False
    branch_removable = True      # with option A even a downsampling block keeps a (subsampled, padded) path

    def remove_branch(self) -> None:
        """SSL depth regularisation removed this block's residual branch: it becomes relu(shortcut(x))."""
        self.branch_removed = True
        self.conv1 = self.bn1 = self.conv2 = self.bn2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_removed:
            return F.relu(self.shortcut(x))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (w, s) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, s if j == 0 else 1))
                in_planes = w
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(widths[2], num_classes)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
