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


# ---- whole random networks --------------------------------------------------------------------------------------
# A small grammar of the structures real CNNs are made of (stems, residual blocks with identity and projection
# shortcuts, bottlenecks, inverted residuals, squeeze-excite, concatenation, grouped and dilated convs, pools,
# assorted activations, a classifier head), drawn at random with odd channel counts and non-square maps, so that
# bugs which only show when blocks meet - a shortcut traced after the branch it is added to, a pooled vector read
# as a map - cannot hide from the fuzz.

ACTS = ("relu", "relu6", "silu", "hardswish", "sigmoid", "gelu", "leaky_relu", "hardtanh", "none")
SPARSITIES = ("dense", "pattern", "pattern+connectivity", "kernels", "empty_filters", "channel_block")


def make_act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid,
            "gelu": nn.GELU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "hardtanh": lambda: nn.Hardtanh(-1.5, 2.0),
            "none": nn.Identity}[name]()


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, k=3, s=1, p=None, groups=1, dilation=1, act="relu", bn=True, bias=False):
        super().__init__()
        p = dilation * (k - 1) // 2 if p is None else p
        self.conv = nn.Conv2d(cin, cout, k, s, p, dilation=dilation, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: 1x1 projection shortcut when the shape changes (or when asked)."""

    def __init__(self, cin, cout, stride, act, project):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act = make_act(act)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if project or stride != 1 or cin != cout else None)
        self.out_act = nn.ReLU()

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        out += identity
        return self.out_act(out)


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride, act, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act = make_act(act)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class SqueezeExcite(nn.Module):
    """``mean``: pooled as timm writes it, ``x.mean((2, 3), keepdim=True)``, else adaptive average pooling."""

    def __init__(self, c, squeeze, gate, mean=False):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()
        self.mean = mean

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True) if self.mean else torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(torch.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, exp, cout, stride, act, se, k=3):
        super().__init__()
        layers = [ConvBNAct(cin, exp, 1, act=act)] if exp != cin else []
        layers.append(ConvBNAct(exp, exp, k, stride, groups=exp, act=act))   # 5x5 s2: row mode or a phase split
        if se:
            layers.append(SqueezeExcite(exp, max(1, exp // 4), se, mean=exp % 2 == 1))
        layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class ConcatBlock(nn.Module):
    """Inception/DenseNet-style: branches concatenated along channels (optionally with the input itself)."""

    def __init__(self, cin, c1, c2, act, keep_input):
        super().__init__()
        self.b1 = ConvBNAct(cin, c1, 1, act=act)
        self.b2 = ConvBNAct(cin, c2, 3, act=act)
        self.keep_input = keep_input

    def forward(self, x):
        parts = [self.b1(x), self.b2(x)] + ([x] if self.keep_input else [])
        return torch.cat(parts, 1)


class ReuseBlock(nn.Module):
    """RepGhost's feature reuse in training form: act(bn(dwconv(x1)) + bn(identity(x1))), x1 = primary(x). The
    identity hides x1's second reader behind an alias: the folder once took the branch's BatchNorm into the
    primary conv, changing x1 for the depthwise branch too (wrong outputs, no error)."""

    def __init__(self, cin, cout, act, primary_act):
        super().__init__()
        self.primary = ConvBNAct(cin, cout, 1, act=primary_act)
        self.cheap = ConvBNAct(cout, cout, 3, groups=cout, act="none")
        self.fusion = nn.Sequential(nn.Identity())
        self.fusion_bn = nn.BatchNorm2d(cout)
        self.act = make_act(act)

    def forward(self, x):
        x1 = self.primary(x)
        return self.act(self.cheap(x1) + self.fusion_bn(self.fusion(x1)))


class InPlaceBlock(nn.Module):
    """An in-place activation whose input is read again afterwards: ``z = act_(y); proj(y) + z``. PyTorch's later
    read of y sees act(y) (the tensor was overwritten); the compiler once read the value from before."""

    def __init__(self, c, cout, act, through_identity):
        super().__init__()
        self.conv = ConvBNAct(c, cout, 3, act="none")
        self.act = make_act(act)
        if hasattr(self.act, "inplace"):
            self.act.inplace = True
        self.alias = nn.Identity() if through_identity else None
        self.proj = nn.Conv2d(cout, cout, 1)

    def forward(self, x):
        y = self.conv(x)
        z = self.act(self.alias(y) if self.alias is not None else y)
        return self.proj(y) + z


class Resize(nn.Module):
    """``F.interpolate`` as decoders write it: up or down by a scale factor (as given, or recomputed from the
    sizes), nearest or bilinear (with or without ``align_corners``), or -- ``skip`` -- a pooled copy resized back
    to the map's own size read in forward and added to it (U-Net's and FPN's top-down step)."""

    def __init__(self, kind: str, mode: str, align_corners: bool, scale, recompute: bool):
        super().__init__()
        self.kind, self.mode, self.scale, self.recompute = kind, mode, scale, recompute
        self.ac = align_corners if mode == "bilinear" else None

    @staticmethod
    def draw(r, h: int, w: int) -> "Resize":
        mode = r.choice(["nearest", "bilinear"])
        ac = r.random() < 0.3
        kinds = ["skip"] + (["up"] if h * w <= 400 else []) + (["down"] if min(h, w) >= 6 else [])
        kind = r.choice(kinds)
        scale = (r.choice([2, 1.5, (2.0, 1.5), (1.25, 3)]) if kind == "up" else
                 r.choice([0.5, (0.5, 0.75), 0.6]) if kind == "down" else None)
        return Resize(kind, mode, ac, scale, r.random() < 0.3)

    def describe(self) -> str:
        return f"{self.kind} {self.mode}{' align_corners' if self.ac else ''} {self.scale or ''}".strip()

    def forward(self, x):
        F = nn.functional
        if self.kind == "skip":
            return x + F.interpolate(F.avg_pool2d(x, 2, ceil_mode=True), size=x.shape[-2:], mode=self.mode,
                                     align_corners=self.ac)
        return F.interpolate(x, scale_factor=self.scale, mode=self.mode, align_corners=self.ac,
                             recompute_scale_factor=self.recompute)


class FunctionalPool(nn.Module):
    """A pool written as ``F.max_pool2d`` / ``F.avg_pool2d`` in forward, as many models do."""

    def __init__(self, mode, k, s, p, ceil=False, include_pad=True):
        super().__init__()
        self.mode, self.k, self.s, self.p, self.ceil, self.include_pad = mode, k, s, p, ceil, include_pad

    def forward(self, x):
        if self.mode == "max":
            return nn.functional.max_pool2d(x, self.k, self.s, self.p, ceil_mode=self.ceil)
        return nn.functional.avg_pool2d(x, self.k, self.s, self.p, count_include_pad=self.include_pad)


class Idiom(nn.Module):
    """Shape-preserving code people write in forward rather than as modules: arithmetic with Python numbers,
    torchvision's ShuffleNet channel shuffle (``x.size()``, ``view``, ``transpose``; or reshape, permute,
    flatten), ``chunk``, ``split`` and strided slices, and a parameter read directly (ConvNeXt's layer scale). The compiler must run each natively or fall back, never fail."""

    KINDS = ("scale_shift", "sub_div", "shuffle", "chunk_swap", "layer_scale")

    def __init__(self, kind: str, c: int, a: float, b: float):
        super().__init__()
        self.kind, self.a, self.b, self.c = kind, a, b, c
        if kind == "layer_scale":
            self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, c).view(c, 1, 1))

    def forward(self, x):
        if self.kind == "scale_shift":
            return x * self.a + self.b
        if self.kind == "sub_div":
            return (self.b - x) / self.a
        # (the form and group count follow a and b, drawn anyway: seeds build the networks they built before)
        if self.kind == "shuffle":
            n, c, h, w = x.size()
            g = 3 if self.a == 3.0 and self.c % 3 == 0 else 2
            if self.b == 0.25:          # the same shuffle written with reshape, permute and flatten
                return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
            x = x.view(n, g, c // g, h, w)
            return torch.transpose(x, 1, 2).contiguous().view(n, -1, h, w)
        if self.kind == "chunk_swap":
            if self.b == 0.25:          # odd channels first, by slices with a step
                return torch.cat((x[:, 1::2], x[:, ::2]), 1)
            if self.a == 3.0 and self.c % 3 == 0:
                x1, x2, x3 = torch.split(x, self.c // 3, dim=1)
                return torch.cat((x3, x1, x2), 1)
            x1, x2 = x.chunk(2, dim=1)
            return torch.cat((x2, x1), 1)
        return x * self.gamma


class RandomNet(nn.Module):
    def __init__(self, stem, blocks, head):
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class _GapHead(nn.Module):
    def __init__(self, c, classes, hidden_act, mean=False):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)
        self.act = make_act(hidden_act)
        self.mean = mean

    def forward(self, x):
        return self.act(self.fc(x.mean((2, 3)) if self.mean else torch.flatten(self.pool(x), 1)))


class _FlatHead(nn.Module):
    FORMS = ("flatten", "view_size", "reshape_shape", "view_minus1")

    def __init__(self, n, classes, form="flatten"):
        super().__init__()
        self.fc = nn.Linear(n, classes)
        self.form, self.n = form, n

    def forward(self, x):
        if self.form == "view_size":
            return self.fc(x.view(x.size(0), -1))
        if self.form == "reshape_shape":
            return self.fc(x.reshape(x.shape[0], -1))
        if self.form == "view_minus1":
            return self.fc(x.view(-1, self.n))
        return self.fc(torch.flatten(x, 1))


def random_phase_network(seed: int) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """A random network around one sparse stride-2 conv on a map large enough for a phase split (the whole-network
    generator's maps rarely are): a 3x3 one as a basic block's first conv or alone, or a 5x5 one; pattern pruning
    with a library of 4 or 8 tap sets (channel blocks: filter groups), or one of the generator's sparsities."""
    import random

    from ..sparsity import PatternConfig, prune
    from ..sparsity.mask import fold_masks

    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    c0, c1, c2 = r.randint(8, 40), r.randint(8, 48), r.randint(8, 48)
    k = r.choice([3, 3, 5])
    act = r.choice(["relu", "silu", "none"])
    second = (BasicBlock(c1, c2, 2, "relu", project=True) if k == 3 and r.random() < 0.5 else
              ConvBNAct(c1, c2, k, 2, act=act))
    m = nn.Sequential(ConvBNAct(3, c0, 3, 1), ConvBNAct(c0, c1, 3, 1), second).eval()
    if seed % 3:
        cfg = PatternConfig(num_patterns=r.choice([4, 8]), connectivity=r.choice([1.5, 3.6]),
                            channel_block=r.choice([1, 1, 2, 4]), connectivity_scope="layer")
        _randomize(m, "dense", g, use_mask_buffers=False)
        m = fold_masks(prune(m, cfg))
        sparsity = f"patterns {cfg.num_patterns} connectivity {cfg.connectivity} channel_block {cfg.channel_block}"
    else:
        sparsity = r.choice([s for s in SPARSITIES if s != "dense"])
        _randomize(m, sparsity, g, use_mask_buffers=False)
    x = torch.randn(r.randint(1, 3), 3, r.randint(24, 61), r.randint(24, 61), generator=g)
    desc = [f"input {'x'.join(map(str, x.shape))}; convs 3->{c0}->{c1}, then {type(second).__name__} {k}x{k} s2 "
            f"->{c2}; sparsity {sparsity}"]
    return m, x, desc


def random_network(seed: int, sparsity: str | None = None, max_blocks: int = 4
                   ) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """A random whole network (eval mode, random BN statistics, random sparsity), its input and a description."""
    import random

    r = random.Random(seed)
    r2 = random.Random(seed * 7919 + 1)     # forward-code idioms: drawn apart, so a seed's layers stay as they were
    r3 = random.Random(seed * 104729 + 2)   # grouped-conv variants (session 45), apart for the same reason
    r4 = random.Random(seed * 15485863 + 3)     # dilated / non-square variants (session 46), the same
    r5 = random.Random(seed * 32452843 + 4)     # resizes (session 47), the same
    g = torch.Generator().manual_seed(seed)
    desc: list[str] = []
    h, w = r.randint(6, 40), r.randint(6, 40)
    cin = r.choice([1, 3, 3, 4])
    batch = r.choice([1, 1, 2, 3, 5, 8])
    k = r.choice([3, 3, 5, 7])
    s = r.choice([1, 2]) if min(h, w) >= 12 else 1
    c = r.randint(3, 40)
    act = r.choice(ACTS)
    stem = [ConvBNAct(cin, c, k, s, act=act, bn=r.random() < 0.8, bias=r.random() < 0.3)]
    desc.append(f"input {batch}x{cin}x{h}x{w}; stem conv{k}x{k} s{s} ->{c} {act}")
    h, w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
    if r.random() < 0.4 and min(h, w) >= 6:
        pk = r.choice([2, 3])
        ps = r.choice([1, 2])
        pp = r.choice([0, pk // 2])
        pool = (nn.MaxPool2d(pk, ps, pp) if r.random() < 0.7 else
                nn.AvgPool2d(pk, ps, pp, count_include_pad=r.random() < 0.5))
        if r2.random() < 0.3:
            pool = FunctionalPool("max" if isinstance(pool, nn.MaxPool2d) else "avg", pk, ps, pp,
                                  include_pad=getattr(pool, "count_include_pad", True))
        stem.append(pool)
        desc.append(f"{type(pool).__name__} k{pk} s{ps} p{pp}")
        h, w = (h + 2 * pp - pk) // ps + 1, (w + 2 * pp - pk) // ps + 1
    blocks = []
    for _ in range(r.randint(1, max_blocks)):
        n_before = len(blocks)
        kind = r.choice(["basic", "basic_proj", "bottleneck", "inverted", "inverted_se", "se", "concat", "grouped",
                         "dilated", "pool", "plain", "reuse", "inplace"])
        stride = 2 if r.random() < 0.3 and min(h, w) >= 4 else 1
        act = r.choice(ACTS)
        if kind in ("basic", "basic_proj"):
            cout = r.choice([c, r.randint(3, 48)])
            blocks.append(BasicBlock(c, cout, stride, act, project=kind == "basic_proj"))
        elif kind == "bottleneck":
            groups = r.choice([1, 1, 2])
            mid = r.randint(2, 16) * groups
            cout = r.choice([c, r.randint(3, 48)])
            blocks.append(Bottleneck(c, mid, cout, stride, act, groups))
        elif kind in ("inverted", "inverted_se"):
            exp = r.choice([c, c * r.choice([2, 3, 4])])
            cout = r.choice([c, r.randint(3, 40)])
            se = r.choice(["sigmoid", "hardsigmoid"]) if kind == "inverted_se" else None
            dk = r.choice([3, 3, 5]) if min(h, w) >= 5 else 3      # 5x5 depthwise (MnasNet, RepGhost)
            blocks.append(InvertedResidual(c, exp, cout, stride, act, se, dk))
        elif kind == "se":
            cout, stride = c, 1
            blocks.append(SqueezeExcite(c, max(1, c // r.choice([2, 4, 8])), r.choice(["sigmoid", "hardsigmoid"]),
                                        mean=r.random() < 0.5))
        elif kind == "concat":
            c1, c2 = r.randint(1, 24), r.randint(1, 24)
            keep = r.random() < 0.5
            cout, stride = c1 + c2 + (c if keep else 0), 1
            blocks.append(ConcatBlock(c, c1, c2, act, keep))
        elif kind == "grouped":
            groups = r.choice([2, 3, 4])
            cin_g = max(1, c // groups)
            ch = cin_g * groups
            blocks.append(ConvBNAct(c, ch, 1, act="none"))     # make the channel count divisible
            cout = groups * r.randint(1, 8)
            gk = 3
            if r3.random() < 0.5:     # 1x1 (ShuffleNet) and 5x5 grouped, and one group per input channel
                gk = r3.choice([1, 3, 5])
                if r3.random() < 0.3:
                    groups = ch
                    cout = ch * r3.choice([1, 2])
            blocks.append(ConvBNAct(ch, cout, gk, stride, groups=groups, act=act))
        elif kind == "dilated":
            cout = r.randint(3, 40)
            v, stride = r4.random(), 1
            if v < 0.4:
                blocks.append(ConvBNAct(c, cout, 3, 1, dilation=2, act=act))
            elif v < 0.7:     # dilation 3 or mixed, depthwise (DeepLab's atrous convs), stride 2
                dil = r4.choice([(2, 2), (3, 3), (2, 1), (1, 3)])
                stride = r4.choice([1, 2]) if min(h, w) >= 8 else 1
                dw = r4.random() < 0.25
                cout = c if dw else cout
                blocks.append(ConvBNAct(c, cout, 3, stride, p=dil, groups=c if dw else 1, dilation=dil, act=act))
            else:             # a non-square pair, 1xk then kx1 (Inception's factorised convs)
                fk = r4.choice([3, 5, 7])
                stride = r4.choice([1, 2]) if min(h, w) >= 8 else 1
                blocks.append(nn.Sequential(ConvBNAct(c, cout, (1, fk), 1, p=(0, fk // 2), act=act),
                                            ConvBNAct(cout, cout, (fk, 1), stride, p=(fk // 2, 0), act=act)))
        elif kind == "pool":
            pk = r.choice([2, 3])
            ps = r.choice([1, 2]) if min(h, w) >= 4 else 1
            pp = r.choice([0, pk // 2])
            blocks.append(nn.MaxPool2d(pk, ps, pp, ceil_mode=r.random() < 0.2) if r.random() < 0.6 else
                          nn.AvgPool2d(pk, ps, pp))
            if r2.random() < 0.3:
                mp = blocks[-1]
                blocks[-1] = FunctionalPool("max" if isinstance(mp, nn.MaxPool2d) else "avg", pk, ps, pp,
                                            ceil=getattr(mp, "ceil_mode", False))
            cout, stride = c, 1
        elif kind == "inplace":
            cout, stride = r.choice([c, r.randint(3, 40)]), 1
            blocks.append(InPlaceBlock(c, cout, r.choice(["relu", "relu6", "silu", "hardswish"]), r.random() < 0.3))
        elif kind == "reuse":
            cout, stride = r.choice([c, r.randint(3, 40)]), 1
            blocks.append(ReuseBlock(c, cout, act, r.choice(["none", act])))
        else:
            cout = r.randint(3, 48)
            kk = r.choice([1, 3, 5])
            blocks.append(ConvBNAct(c, cout, kk, stride, act=act, bias=r.random() < 0.5))
        try:     # a block that the map has become too small for is dropped again
            with torch.no_grad():
                h2, w2 = RandomNet(nn.Sequential(*stem), blocks, nn.Identity()).eval()(
                    torch.zeros(1, cin, *_in_hw(desc))).shape[2:]
        except RuntimeError:
            blocks[n_before:] = []
            continue
        desc.append(f"{kind} {c}->{cout} s{stride} {act}: {type(blocks[-1]).__name__}")
        c, h, w = cout, h2, w2
        if r2.random() < 0.2:
            ik = r2.choice([k_ for k_ in Idiom.KINDS if c % 2 == 0 or k_ not in ("shuffle", "chunk_swap")])
            blocks.append(Idiom(ik, c, r2.choice([0.5, 2.0, -1.5, 3.0]), r2.choice([0.0, 0.25, -1.0])))
            desc.append(f"idiom {ik}")
        if r5.random() < 0.12:
            rz = Resize.draw(r5, h, w)
            blocks.append(rz)
            with torch.no_grad():
                h, w = RandomNet(nn.Sequential(*stem), blocks, nn.Identity()).eval()(
                    torch.zeros(1, cin, *_in_hw(desc))).shape[2:]
            desc.append(f"resize {rz.describe()}")
    classes = r.randint(2, 12)
    if r.random() < 0.8 or h * w * c > 4096:
        head = _GapHead(c, classes, r.choice(["none", "none", "relu", "sigmoid"]), mean=r.random() < 0.3)
        desc.append(f"gap -> linear {c}->{classes}")
    else:
        form = r2.choice(_FlatHead.FORMS)
        head = _FlatHead(c * h * w, classes, form)
        desc.append(f"flatten ({form}) -> linear {c * h * w}->{classes}")
    net = RandomNet(nn.Sequential(*stem), blocks, head)
    sparsity = sparsity or r.choice(SPARSITIES)
    desc.append(f"sparsity {sparsity}")
    _randomize(net, sparsity, g, use_mask_buffers=r.random() < 0.5)
    x = torch.randn(batch, cin, *_in_hw(desc), generator=g)
    return net.eval(), x, desc


def _in_hw(desc: list[str]) -> tuple[int, int]:
    dims = desc[0].split(";")[0].split()[1].split("x")
    return int(dims[2]), int(dims[3])


def random_bn_statistics(model: nn.Module, g: torch.Generator) -> nn.Module:
    """BatchNorm affine parameters and running statistics that are not the identity, so folding is exercised
    (and timed) as it will be on trained weights."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            _random_bn(mod, g)
    return model


@torch.no_grad()
def _random_bn(mod: nn.BatchNorm2d, g: torch.Generator) -> None:
    mod.weight.copy_(1 + 0.2 * torch.randn(mod.num_features, generator=g))
    mod.bias.copy_(0.2 * torch.randn(mod.num_features, generator=g))
    mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
    mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=g))


def _randomize(net: nn.Module, sparsity: str, g: torch.Generator, use_mask_buffers: bool) -> None:
    """Random weights with BN statistics that are not the identity, then the sparsity: weights zeroed, or
    ``weight_mask`` buffers as pruning leaves them."""
    cands = all_candidates()
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, nn.BatchNorm2d):
                _random_bn(mod, g)
        if sparsity == "dense":
            return
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)][1:]     # the stem stays dense
        for m in convs:
            o, i, kh, kw = m.weight.shape
            mask = torch.ones_like(m.weight)
            if sparsity in ("pattern", "pattern+connectivity") and (kh, kw) == (3, 3):
                mask = cands[torch.randint(0, len(cands), (o, i), generator=g)].reshape(o, i, 3, 3).float()
            if sparsity in ("pattern+connectivity", "kernels") and m.groups == 1:
                mask = mask * (torch.rand(o, i, 1, 1, generator=g) < 0.3).float()
            if sparsity == "empty_filters":
                mask = mask * (torch.rand(o, 1, 1, 1, generator=g) < 0.6).float()
            if sparsity == "channel_block" and m.groups == 1:
                # channel_block pruning: blocks of b adjacent filters share pattern and kept kernels (the engine
                # runs them as filter groups); a few kernels then dropped alone, so groups are not all exact
                # 2 and 4 (filter groups), 16 (output-channel vectors over each block's kept kernels)
                b = (2, 4, 16)[int(torch.randint(0, 3, (1,), generator=g))] if o > 1 else 1
                nb = -(-o // b)
                blk = torch.ones(nb, i, kh, kw)
                if (kh, kw) == (3, 3):
                    blk = cands[torch.randint(0, len(cands), (nb, i), generator=g)].reshape(nb, i, 3, 3).float()
                blk = blk * (torch.rand(nb, i, 1, 1, generator=g) < 0.3).float()
                mask = blk.repeat_interleave(b, 0)[:o] * (torch.rand(o, i, 1, 1, generator=g) > 0.02).float()
            m.weight.mul_(mask)          # as pruning leaves a layer: weights zero where the mask is
            if use_mask_buffers:
                m.register_buffer("weight_mask", mask)


def with_nonfinite(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x`` with a NaN at one random position of the first image and an Inf in the last (batch > 1)."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    n, c, h, w = x.shape
    x[0, int(torch.randint(c, (1,), generator=g)), int(torch.randint(h, (1,), generator=g)),
      int(torch.randint(w, (1,), generator=g))] = float("nan")
    if n > 1:
        x[-1, int(torch.randint(c, (1,), generator=g)), 0, 0] = float("inf")
    return x


def compare_outputs(out: torch.Tensor, ref: torch.Tensor, sparse: bool, rtol: float = 1e-4,
                    atol: float = 1e-5) -> tuple[bool, str]:
    """The engine's output against PyTorch's: ``max |out - ref| <= rtol * max |ref| + atol`` over the finite
    values, and NaN/Inf exactly where PyTorch has them.

    A pruned weight is absent in the engine, while PyTorch multiplies it (0 * NaN = NaN, 0 * Inf = NaN): for a
    sparse network the engine may be finite where PyTorch is not, never the other way round.
    """
    if out.shape != ref.shape:
        return False, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    fin_ref, fin_out = ref.isfinite(), out.isfinite()
    if sparse:
        if bool((~fin_out & fin_ref).any()):
            return False, f"{int((~fin_out & fin_ref).sum())} non-finite values where PyTorch is finite"
        both = fin_ref & fin_out     # (where both are non-finite, Inf vs NaN may differ: 0 * Inf is skipped)
    else:
        if not torch.equal(ref.isnan(), out.isnan()) or not torch.equal(ref.isinf() & (ref > 0), out.isinf() & (out > 0)) \
                or not torch.equal(ref.isinf() & (ref < 0), out.isinf() & (out < 0)):
            return False, (f"non-finite values differ: NaN {int(out.isnan().sum())} vs {int(ref.isnan().sum())}, "
                           f"Inf {int(out.isinf().sum())} vs {int(ref.isinf().sum())}")
        both = fin_ref
    if not bool(both.any()):
        return True, "no finite values"
    err = float((out[both] - ref[both]).abs().max())
    scale = float(ref[both].abs().max())
    ok = err <= rtol * scale + atol
    return ok, f"max err {err:.3g} (scale {scale:.3g})"
