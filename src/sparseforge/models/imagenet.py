"""ImageNet-size networks with torchvision's module names, so a torchvision ``state_dict`` loads strictly.

ResNet-18/34/50 (v1.5: the bottleneck strides in its 3x3 conv), ResNeXt-50 32x4d, VGG-16-BN and MobileNetV2 for
224x224 inputs; the bottleneck ResNets take torchvision's ``replace_stride_with_dilation`` (DeepLab's backbones). torchvision itself is not a dependency: the layouts are rebuilt here and pinned by tests on
parameter counts and key names (torchvision: resnet18 11,689,512 parameters, resnet34 21,797,672, resnet50
25,557,032, resnext50_32x4d 25,028,904, vgg16_bn 138,365,992, mobilenet_v2 3,504,872).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SparseforgeError
from .vgg import VGG16_CFG, vgg_features


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        if dilation > 1:
            raise SparseforgeError("replace_stride_with_dilation needs bottleneck blocks (resnet50, resnext50_32x4d), "
                                   "as in torchvision; resnet18/34 keep their strides")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """``groups`` / ``base_width``: ResNeXt's grouped 3x3 (torchvision's width = planes * base_width / 64 * groups)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, groups=groups, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: type, layers: tuple[int, ...], num_classes: int = 1000, groups: int = 1,
                 width_per_group: int = 64, replace_stride_with_dilation: tuple | list | None = None):
        """``replace_stride_with_dilation``: for layer2-4, whether to keep the map size and dilate instead of
        striding (torchvision's; DeepLabv3's backbone is (False, True, True): output stride 8)."""
        super().__init__()
        rswd = tuple(replace_stride_with_dilation or (False, False, False))
        if len(rswd) != 3:
            raise SparseforgeError("replace_stride_with_dilation takes 3 booleans (layer2, layer3, layer4), "
                                   f"got {replace_stride_with_dilation!r}")
        self.inplanes, self.dilation = 64, 1
        # (bottleneck blocks only, as in torchvision)
        self.block_kw = {} if groups == 1 and width_per_group == 64 else {"groups": groups, "base_width": width_per_group}
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, rswd[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, rswd[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, rswd[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1, dilate: bool = False
                    ) -> nn.Sequential:
        # (torchvision's: a dilated layer's first block keeps the previous dilation, the rest take the new one)
        before = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))

        def kw(d: int) -> dict:
            return {**self.block_kw, **({"dilation": d} if d > 1 else {})}

        layers = [block(self.inplanes, planes, stride, downsample, **kw(before))]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **kw(self.dilation)) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))




class VGGImageNet(nn.Module):
    """torchvision's vgg16_bn: convs with bias, BN, ReLU; 7x7 adaptive pool; 4096-4096-classes classifier."""

    def __init__(self, num_classes: int = 1000, cfg: tuple = VGG16_CFG, dropout: float = 0.5):
        super().__init__()
        self.features = vgg_features(cfg, bias=True)[0]
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
                                        nn.Linear(4096, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _conv_bn_act(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation (keys .0 conv, .1 bn, .2 activation)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidualV2(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [_conv_bn_act(c_in, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


IMAGENET_V2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                   (6, 320, 1, 1))


class MobileNetV2ImageNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        c_in = 32
        features: list[nn.Module] = [_conv_bn_act(3, c_in, 3, 2)]
        for t, c, n, s in IMAGENET_V2_CFG:
            for i in range(n):
                features.append(InvertedResidualV2(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(_conv_bn_act(c_in, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle as torchvision writes it (sizes read in forward, view, transpose, view): the engine
    proves it is a channel permutation on probes and runs it as plane copies (``trace.channel_gathers``)."""
    n, c, h, w = x.size()
    x = torch.transpose(x.view(n, groups, c // groups, h, w), 1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnitV2(nn.Module):
    """ShuffleNetV2's unit, torchvision's keys: stride 1 splits the channels (``chunk``) and transforms one half;
    stride 2 transforms both copies (``branch1`` downsamples the input). Then the halves are shuffled."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, half = stride, c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                                         nn.BatchNorm2d(c_in), nn.Conv2d(c_in, half, 1, bias=False),
                                         nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(c_in if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


SHUFFLENET_V2_WIDTHS = {0.5: (24, 48, 96, 192, 1024), 1.0: (24, 116, 232, 464, 1024),
                        1.5: (24, 176, 352, 704, 1024), 2.0: (24, 244, 488, 976, 2048)}


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 (Ma et al. 2018) for 224x224 input, torchvision's layout and module names (conv1, maxpool,
    stage2-4, conv5, fc), so its state dicts load strictly."""

    def __init__(self, width: float = 1.0, num_classes: int = 1000, repeats: tuple = (4, 8, 4)):
        super().__init__()
        if width not in SHUFFLENET_V2_WIDTHS:
            raise ValueError(f"ShuffleNetV2 width must be one of {sorted(SHUFFLENET_V2_WIDTHS)}, got {width}")
        chans = SHUFFLENET_V2_WIDTHS[width]
        self.conv1 = nn.Sequential(nn.Conv2d(3, chans[0], 3, 2, 1, bias=False), nn.BatchNorm2d(chans[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = chans[0]
        for i, (n, c) in enumerate(zip(repeats, chans[1:4])):
            setattr(self, f"stage{i + 2}", nn.Sequential(ShuffleUnitV2(c_in, c, 2),
                                                          *[ShuffleUnitV2(c, c, 1) for _ in range(n - 1)]))
            c_in = c
        self.conv5 = nn.Sequential(nn.Conv2d(c_in, chans[4], 1, bias=False), nn.BatchNorm2d(chans[4]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(chans[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(self.conv5(x).mean([2, 3]))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes)


def resnet50(num_classes: int = 1000, replace_stride_with_dilation: tuple | list | None = None) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, replace_stride_with_dilation=replace_stride_with_dilation)


def resnext50_32x4d(num_classes: int = 1000, replace_stride_with_dilation: tuple | list | None = None) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, groups=32, width_per_group=4,
                  replace_stride_with_dilation=replace_stride_with_dilation)
