"""VGG-16 with BatchNorm for 32x32 inputs: 13 3x3 convs + one linear classifier.

The CIFAR variant (as in network-slimming / early-bird code): five max-pools
bring 32x32 to 1x1, so the classifier is a single Linear(512, classes).
"""

from __future__ import annotations

import torch
import torch.nn as nn

VGG16_CFG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg_features(cfg: tuple, width_mult: float = 1.0, bias: bool = False) -> tuple[nn.Sequential, int]:
    """The conv-BN-ReLU / max-pool stack of a VGG config (numbers: output channels, "M": a 2x2 max pool) and
    its output channels; the CIFAR and the ImageNet (torchvision layout, convs with bias) VGGs share it."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            c = max(1, int(round(v * width_mult)))
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=bias), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
    return nn.Sequential(*layers), c_in


class VGG(nn.Module):
    def __init__(self, cfg: tuple = VGG16_CFG, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        self.features, c_in = vgg_features(cfg, width_mult)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)
