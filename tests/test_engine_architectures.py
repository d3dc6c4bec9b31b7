"""Architectures outside the model zoo, written as torchvision writes them (narrow, small inputs), through the
compiler vs PyTorch: what a user hands over is ordinary forward code, not the zoo's.

Each must compile (no refusal), match PyTorch at the traced batch and another one with NaN and Inf in the input,
and run natively wherever the test says it should: these forms once stopped the compiler (ShuffleNetV2's
``x.size()``, ConvNeXt's parameters read in forward, ``x.view(x.size(0), -1)``) or fell back (ceil_mode and
functional pools, number arithmetic, ResNeXt's grouped convs, ShuffleNetV2's chunk and channel shuffle, GoogLeNet's
channel slices, U-Net's bilinear resize to a size read in forward).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine_util import randomize_bn
from sparseforge.engine import compile
from sparseforge.engine.testing import compare_outputs, with_nonfinite
from sparseforge.models.imagenet import Bottleneck


def _shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride, bf = stride, oup // 2
        self.branch1 = nn.Sequential(
            nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
            nn.Conv2d(inp, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True),
        ) if stride > 1 else nn.Sequential()
        i2 = inp if stride > 1 else bf
        self.branch2 = nn.Sequential(nn.Conv2d(i2, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True),
                                     nn.Conv2d(bf, bf, 3, stride, 1, groups=bf, bias=False), nn.BatchNorm2d(bf),
                                     nn.Conv2d(bf, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stages = nn.Sequential(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1))
        self.conv5 = nn.Sequential(nn.Conv2d(32, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


class Fire(nn.Module):
    def __init__(self, inp, s, e1, e3):
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(inp, s, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(s, e1, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(s, e3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 24, 3, stride=2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, ceil_mode=True), Fire(24, 8, 16, 16), Fire(32, 8, 16, 16),
                                      nn.MaxPool2d(3, 2, ceil_mode=True), Fire(32, 16, 24, 24))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(48, 10, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.linspace(0.1, 1.0, dim).view(dim, 1, 1))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class ConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), LayerNorm2d(16))
        self.stage = nn.Sequential(CNBlock(16), CNBlock(16))
        self.down = nn.Sequential(LayerNorm2d(16), nn.Conv2d(16, 32, 2, stride=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.LayerNorm(32), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.down(self.stage(self.stem(x))))


class BasicConv2d(nn.Module):
    def __init__(self, i, o, **kw):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(i, o, bias=False, **kw), nn.BatchNorm2d(o, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    def __init__(self, i, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(i, 16, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(i, 12, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(12, 16, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(i, 16, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(16, 24, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(24, 24, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(i, pool_features, kernel_size=1)

    def forward(self, x):
        bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(bp)], 1)


class GoogLeNetStyle(nn.Module):
    """Inception-v3's stem and A block, GoogLeNet's ``transform_input`` (channel slices scaled by numbers) and
    ceil_mode pool, the head through ``F.adaptive_avg_pool2d`` and ``F.dropout``."""

    def __init__(self):
        super().__init__()
        self.conv1 = BasicConv2d(3, 24, kernel_size=3, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.mixed = InceptionA(24, 8)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.cat((torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
                       torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
                       torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5), 1)
        x = self.mixed(self.pool(self.conv1(x)))
        x = F.dropout(F.adaptive_avg_pool2d(x, (1, 1)), training=self.training)
        return self.fc(torch.flatten(x, 1))


class SElayer(nn.Module):
    def __init__(self, c, s):
        super().__init__()
        self.fc1, self.fc2, self.relu = nn.Conv2d(c, s, 1), nn.Conv2d(s, c, 1), nn.ReLU(inplace=True)

    def forward(self, x):
        s = self.fc2(self.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * F.hardsigmoid(s, inplace=True)


class MBV3Block(nn.Module):
    def __init__(self, i, e, o, k, s):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(i, e, 1, bias=False), nn.BatchNorm2d(e), nn.Hardswish(inplace=True),
                                   nn.Conv2d(e, e, k, s, k // 2, groups=e, bias=False), nn.BatchNorm2d(e),
                                   nn.Hardswish(inplace=True), SElayer(e, max(8, e // 4)),
                                   nn.Conv2d(e, o, 1, bias=False), nn.BatchNorm2d(o))
        self.use_res_connect = s == 1 and i == o

    def forward(self, x):
        r = self.block(x)
        if self.use_res_connect:
            r += x
        return r


class MobileNetV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(inplace=True)),
            MBV3Block(16, 48, 24, 3, 2), MBV3Block(24, 72, 24, 3, 1), MBV3Block(24, 96, 40, 5, 2))
        self.classifier = nn.Sequential(nn.Linear(40, 64), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                                        nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class DenseLayer(nn.Module):
    def __init__(self, i, g):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(i), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(i, 4 * g, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(4 * g), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4 * g, g, 3, 1, 1, bias=False)

    def forward(self, prev):
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(torch.cat(prev, 1)))))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n, i, g):
        super().__init__()
        for j in range(n):
            self.add_module(f"denselayer{j + 1}", DenseLayer(i + j * g, g))

    def forward(self, init):
        feats = [init]
        for _, layer in self.items():
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1), DenseBlock(3, 16, 8), nn.BatchNorm2d(40),
                                      nn.ReLU(inplace=True), nn.Conv2d(40, 20, 1, bias=False), nn.AvgPool2d(2, 2),
                                      DenseBlock(2, 20, 8), nn.BatchNorm2d(36))
        self.classifier = nn.Linear(36, 10)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(F.relu(self.features(x), inplace=True), (1, 1))
        return self.classifier(torch.flatten(out, 1))


class KuangliuResNet(nn.Module):
    """The CIFAR ResNet most tutorials copy: ``F.avg_pool2d(out, 4)`` then ``out.view(out.size(0), -1)``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.shortcut = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.linear = nn.Linear(32, 10)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)) + self.shortcut(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class AlexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                                      nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(32 * 9, 32), nn.ReLU(inplace=True),
                                        nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class UNetStyle(nn.Module):
    """A decoder step: upsampling to a skip connection's size read from ``a.shape`` in forward."""

    def __init__(self):
        super().__init__()
        self.d1, self.d2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, 2, 1)
        self.u = nn.Conv2d(48, 8, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.d1(x))
        b = F.relu(self.d2(a))
        up = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.u(torch.cat([a, up], dim=1))


def _proj(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        # the zoo's bottleneck (torchvision's) with groups: width = planes * base_width / 64 * groups
        self.layer1 = nn.Sequential(Bottleneck(32, 16, 1, _proj(32, 64, 1), groups=16, base_width=16),
                                    Bottleneck(64, 16, groups=16, base_width=16))
        self.layer2 = nn.Sequential(Bottleneck(64, 32, 2, _proj(64, 128, 2), groups=32, base_width=8))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


class DeepLabStyle(nn.Module):
    """DeepLabv3's shape at small size: the zoo's bottlenecks dilated instead of strided (dilation 2, then 4: a
    9x9 reach, which stays in oneDNN), an atrous pyramid (1x1, 3x3 dilation 2 and 3, image pooling broadcast) and
    a per-pixel head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = nn.Sequential(Bottleneck(32, 16, 1, _proj(32, 64, 1)),
                                    Bottleneck(64, 16, dilation=2))
        self.layer2 = nn.Sequential(Bottleneck(64, 32, 1, _proj(64, 128, 1), dilation=2),
                                    Bottleneck(128, 32, dilation=4))
        self.aspp = nn.ModuleList([nn.Sequential(nn.Conv2d(128, 32, k, 1, d * (k // 2), d, bias=False),
                                                 nn.BatchNorm2d(32), nn.ReLU()) for k, d in ((1, 1), (3, 2), (3, 3))])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(128, 32, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(128, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 5, 1))

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        p = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.head(torch.cat([b(x) for b in self.aspp] + [p], 1))


# name: (model, input H x W, must every op be native?)
ARCHS = {
    "shufflenet_v2": (ShuffleNetV2, (48, 50), True),
    "squeezenet": (SqueezeNet, (49, 49), True),
    "convnext": (ConvNeXt, (32, 36), False),
    "googlenet_style": (GoogLeNetStyle, (37, 39), True),
    "mobilenet_v3": (MobileNetV3, (40, 44), True),
    "densenet": (DenseNet, (40, 40), True),
    "kuangliu_resnet": (KuangliuResNet, (8, 8), True),
    "alexnet": (AlexNet, (99, 99), False),
    "unet_style": (UNetStyle, (20, 22), True),
    "resnext": (ResNeXt, (56, 60), True),
    "deeplab_style": (DeepLabStyle, (40, 44), False),
}


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", list(ARCHS))
def test_architectures_compile_and_match_pytorch(name, sparse):
    import sparseforge as sf

    cls, hw, all_native = ARCHS[name]
    torch.manual_seed(0)
    m = randomize_bn(cls().eval())
    if sparse:
        sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=2.0, connectivity_scope="layer"))
    e = compile(m, torch.randn(1, 3, *hw), threads=2)
    fallbacks = [op for op in e.spec["ops"] if not op["native"]]
    assert not (all_native and fallbacks), e.summary(profile=False)
    assert any(op["native"] and op["kind"] == "conv" for op in e.spec["ops"])
    if name == "deeplab_style":         # sparse: the dilation-2/3 convs embedded, dense: all in oneDNN
        embedded = [op for op in e.spec["ops"] if "(embeds 3x3 d" in op["describe"]]
        assert len(embedded) == (4 if sparse else 0), e.summary(profile=False)
    for b in (1, 3):
        x = torch.randn(b, 3, *hw) if b == 1 else with_nonfinite(torch.randn(b, 3, *hw), seed=7)
        with torch.inference_mode():
            ok, why = compare_outputs(e(x), m(x), sparse=sparse)
        assert ok, (b, why)
