"""MobileNetV2 for CIFAR: stride-1 stem and stride 1 in the second stage, so 32x32 ends at 4x4."""

from __future__ import annotations

import torch
import torch.nn as nn

# (expansion t, out channels c, repeats n, first stride s); CIFAR: stage 2 stride 2 -> 1.
CIFAR_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    branch_removed = False

    @property
    def branch_removable(self) -> bool:
        """Only a block with an identity shortcut can lose its branch (it then passes its input through)."""
        return self.use_residual

    def remove_branch(self) -> None:
        """Depth pruning / SSL dropped this block's branch: it becomes the identity."""
        if not self.use_residual:
            raise ValueError("an inverted-residual block without a shortcut cannot drop its branch")
        self.branch_removed = True
        self.conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_removed:
            return x
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, cfg: tuple = CIFAR_CFG):
        super().__init__()

        def w(c: int) -> int:
            return max(8, int(round(c * width_mult / 8)) * 8) if width_mult != 1.0 else c

        c_in = w(32)
        features: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, c_in, 3, 1, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU6(inplace=True))]
        for t, c, n, s in cfg:
            for i in range(n):
                features.append(InvertedResidual(c_in, w(c), s if i == 0 else 1, t))
                c_in = w(c)
        last = w(1280) if width_mult > 1.0 else 1280
        features.append(nn.Sequential(nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)
