"""Whole networks through the compiler vs PyTorch: the block combinations real CNNs are made of.

Regression tests for bugs that only showed when blocks meet (a projection shortcut traced after the branch it is
added to, a pooled vector read as a map by squeeze-excite's 1x1 convs, NaN turned into 0 by the generated ReLU),
then a fuzz over generated networks (engine.testing.random_network: stems, basic/bottleneck/inverted/SE/concat/
grouped/dilated blocks, pools, six activations, odd channel counts, non-square inputs, batch 1-8, dense and sparse).
bench/engine_fuzz.py --networks runs thousands.
"""

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine_util import randomize_bn, rel_err
from test_engine_architectures import LayerNorm2d
from sparseforge.engine import compile
from sparseforge.errors import SparseforgeError
from sparseforge.engine.plan import PlanOptions
from sparseforge.engine.testing import (BasicBlock, Bottleneck, InPlaceBlock, InvertedResidual, ReuseBlock,
                                        SqueezeExcite, compare_outputs, random_network, with_nonfinite)

CI_NETWORKS = 200


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEFORGE_CACHE", str(tmp_path_factory.mktemp("netcache")))
    yield
    mp.undo()


def _prune_kernels(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                m.weight.mul_((torch.rand(m.weight.shape[:2] + (1, 1), generator=g) < 0.3).float())


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_projection_shortcut_block(kind, stride, pruned):
    """torchvision's layout: out = bn2(conv2(...)); out += downsample(x) - the shortcut conv runs after the
    branch, so the add may only go into the epilogue of the conv traced last."""
    torch.manual_seed(stride)
    block = (BasicBlock(16, 32, stride, "relu", project=True) if kind == "basic"
             else Bottleneck(16, 8, 32, stride, "relu", groups=1))
    m = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), block)
    randomize_bn(m, seed=stride)
    if pruned:
        _prune_kernels(m, stride)
    x = torch.randn(2, 3, 16, 12)
    e = compile(m, x[:1], threads=2)
    with torch.inference_mode():
        assert rel_err(e(x), m(x)) < 1e-5
    assert all(op["native"] for op in e.spec["ops"])


@pytest.mark.parametrize("stride", [1, 2])
def test_projection_blocks_run_as_one_stacked_conv(stride):
    """A bottleneck's conv3 and its projection shortcut run as one 1x1 conv over [conv2's output; the block
    input] stacked in place (PlanOptions.fuse_projection): conv2 and the shortcut's producer write their slices of
    one buffer, read one image apart by its stride. Batch 1 and 3 (a wrong image stride shows only past image
    0), 1-3 threads, NaN/Inf, pruned kernels: as in PyTorch. A block reading the network input is left unfused
    at stride 1 (the input is not the engine's to lay out; at stride 2 its subsample is), and all with the knob
    off."""
    from sparseforge.engine.ir import ConcatOp, ConvOp

    torch.manual_seed(10 + stride)
    m = nn.Sequential(nn.Conv2d(3, 12, 3, 1, 1), nn.BatchNorm2d(12), nn.ReLU(),
                      Bottleneck(12, 8, 20, stride, "relu", 1), Bottleneck(20, 8, 20, 1, "silu", 1),
                      Bottleneck(20, 16, 36, stride, "relu6", 1))
    randomize_bn(m, seed=stride)
    _prune_kernels(m, stride)
    x = torch.randn(3, 3, 17, 22)
    x[1, 0, 5, 7], x[2, 1, 9, 3] = float("nan"), float("inf")
    first = Bottleneck(3, 8, 16, stride, "relu", 1)
    randomize_bn(first, seed=stride)
    for net, n_fused in ((m, 2), (first, stride - 1)):
        with torch.inference_mode():
            ref = net(x)
        for fuse, threads in ((True, 1), (True, 2), (True, 3), (False, 2)):
            e, st = compile(net, x[:1], threads=threads, return_stages=True,
                            plan_options=PlanOptions(fuse_projection=fuse))
            stacked = [op for op in st.graph.ops if isinstance(op, ConvOp) and "+" in op.name]
            assert len(stacked) == (n_fused if fuse else 0), e.summary(profile=False)
            assert all(op.residual is None and op.act != "none" for op in stacked)
            cats = [k for k, op in enumerate(st.graph.ops) if isinstance(op, ConcatOp)]
            assert all(k in st.plan.absorbed and all(v in st.plan.aliases for v in st.graph.ops[k].inputs)
                       for k in cats)
            with torch.inference_mode():
                for xb in (x[:1], x):
                    ok, why = compare_outputs(e(xb), ref[: len(xb)], sparse=True)
                    assert ok, (fuse, threads, len(xb), why)


def test_concatenations_written_in_place():
    """Each input of a channel concatenation is written by its producer straight into its channel range of the
    concatenation (the concat op copies nothing): branches, the block input itself, a concatenation nested in
    another (its inputs land in the outer buffer at its offset), 1-3 threads, batch 1 and 5, NaN/Inf. An input
    already written into another concatenation, or the network input, is copied instead."""
    from sparseforge.engine.ir import ConcatOp
    from sparseforge.engine.testing import ConvBNAct

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = ConvBNAct(3, 10, 3, act="relu")
            self.b1, self.b2 = ConvBNAct(10, 5, 1, act="silu"), ConvBNAct(10, 7, 3, act="hardswish")
            self.mix = ConvBNAct(22, 9, 3, act="relu6")
            self.head = nn.Conv2d(9 + 5 + 3, 4, 1)

        def forward(self, x):
            a = self.stem(x)
            p = self.b1(a)
            z = torch.cat([p, torch.cat([self.b2(a), a], 1)], 1)    # in place, the inner one nested in z
            return self.head(torch.cat([self.mix(z), p, x], 1))    # copied: p is z's, x the network input

    torch.manual_seed(4)
    m = Net().eval()
    randomize_bn(m, seed=4)
    _prune_kernels(m, 4)
    x = torch.randn(5, 3, 13, 19)
    x[0, 2, 6, 6], x[3, 0, 1, 18] = float("inf"), float("nan")
    with torch.inference_mode():
        ref = m(x)
    for threads in (1, 2, 3):
        e, st = compile(m, x[:1], threads=threads, return_stages=True)
        cats = [(k, op) for k, op in enumerate(st.graph.ops) if isinstance(op, ConcatOp)]
        assert len(cats) == 3
        (ki, ci), (k0, c0), (k1, c1) = cats
        z = c0.output
        assert ki in st.plan.absorbed and k0 in st.plan.absorbed and c0.inputs[1] == ci.output
        assert [st.plan.aliases[v] for v in c0.inputs + ci.inputs] == [(z, 0), (z, 5), (z, 5), (z, 12)]
        assert k1 not in st.plan.absorbed and all(st.plan.aliases.get(v, (-1,))[0] != c1.output for v in c1.inputs)
        with torch.inference_mode():
            for xb in (x[:1], x):
                ok, why = compare_outputs(e(xb), ref[: len(xb)], sparse=True)
                assert ok, (threads, len(xb), why)


def test_dense_blocks_concatenate_in_place():
    """DenseNet's layers each concatenate every feature before them (torchvision's layout: ``torch.cat(features,
    1)`` per layer, then the block's own): every such concatenation is a prefix of the block's last one, so all
    features are written once into that buffer and each layer's concatenation is a view of it, nothing copied;
    a block after a transition gets its own buffer. Pre-activation BatchNorm on the views, 1-3 threads, batch 1
    and 3, NaN/Inf: as in PyTorch, and as with concatenations copied (PlanOptions.concat_in_place=False)."""
    from sparseforge.engine.ir import ConcatOp

    class Layer(nn.Module):
        def __init__(self, cin, g):
            super().__init__()
            self.bn1, self.c1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * g, 1, bias=False)
            self.bn2, self.c2 = nn.BatchNorm2d(4 * g), nn.Conv2d(4 * g, g, 3, 1, 1, bias=False)

        def forward(self, feats):
            x = torch.cat(feats, 1)
            return self.c2(torch.relu(self.bn2(self.c1(torch.relu(self.bn1(x))))))

    class DenseBlock(nn.Module):
        def __init__(self, cin, g, n):
            super().__init__()
            self.layers = nn.ModuleList([Layer(cin + i * g, g) for i in range(n)])

        def forward(self, x):
            feats = [x]
            for layer in self.layers:
                feats.append(layer(feats))
            return torch.cat(feats, 1)

    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), DenseBlock(8, 4, 4), nn.BatchNorm2d(24), nn.ReLU(),
                      nn.Conv2d(24, 10, 1), nn.AvgPool2d(2), DenseBlock(10, 3, 3), nn.Conv2d(19, 5, 1))
    randomize_bn(m, seed=6)
    x = torch.randn(3, 3, 14, 17)
    x[1, 0, 3, 3], x[2, 2, 5, 9] = float("nan"), float("inf")
    with torch.inference_mode():
        ref = m(x)
    for in_place, threads in ((True, 1), (True, 2), (True, 3), (False, 2)):
        e, st = compile(m, x[:1], threads=threads, return_stages=True,
                        plan_options=PlanOptions(concat_in_place=in_place))
        cats = [k for k, op in enumerate(st.graph.ops) if isinstance(op, ConcatOp)]
        assert len(cats) == 9 and all((k in st.plan.absorbed) == in_place for k in cats)
        assert len({z for z, _ in st.plan.aliases.values()}) == (2 if in_place else 0)
        with torch.inference_mode():
            for xb in (x[:1], x):
                ok, why = compare_outputs(e(xb), ref[: len(xb)], sparse=False)
                assert ok, (in_place, threads, len(xb), why)


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_squeeze_excite(gate, mean):
    """The pooled (C,1,1) vector is read by 1x1 convs as a map: it must be laid out as one. Pooled by
    ``x.mean((2, 3), keepdim=True)`` (timm's way) it is the same native op."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1), nn.ReLU(), SqueezeExcite(24, 6, gate, mean=mean)).eval()
    x = torch.randn(3, 3, 10, 14)
    e = compile(m, x[:1], threads=2)
    with torch.inference_mode():
        assert rel_err(e(x), m(x)) < 1e-5
    assert all(op["native"] for op in e.spec["ops"])


def test_two_byte_channel_indices_change_no_result():
    """Kernel channel indices stored as 2-byte integers (PlanOptions.index16, the default) or as ints: the same
    kernels in the same order, so the outputs are bit-identical; every sparse mode that streams indices (flat,
    flat-tiled with merged runs and channel blocks, direct, packed 1x1, gather's filter lists); the blob is smaller."""
    from sparseforge import PatternConfig, prune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1), nn.ReLU(), nn.Conv2d(24, 40, 3, 1, 1), nn.ReLU(),
                      nn.Conv2d(40, 40, 3, 2, 1), nn.ReLU(), nn.Conv2d(40, 72, 1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(72, 80, 1), nn.ReLU(), nn.Conv2d(80, 64, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(64, 128, 1), nn.ReLU(), nn.Conv2d(128, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    prune(m, PatternConfig(num_patterns=8, connectivity=3.6, connectivity_1x1=8.0))
    x = torch.randn(2, 3, 44, 40)
    x[1, 0, 3, 3] = float("nan")
    outs, sizes = [], []
    for i16 in (True, False):
        for merged in (True, False):
            e, st = compile(m, x[:1], threads=2, return_stages=True,
                            plan_options=PlanOptions(index16=i16, merged_runs=merged, flat_cblock_bytes=4096))
            assert {c.idx16 for c in st.plan.convs.values() if not c.blocked} == {i16}
            modes = {c.mode for c in st.plan.convs.values()}
            with torch.inference_mode():
                outs.append(e(x))
            sizes.append(st.plan.blob.ints().nbytes)
    assert {"flat-tiled", "direct", "packed1", "gather"} <= modes, modes
    assert all(torch.equal(o.nan_to_num(), outs[0].nan_to_num()) and torch.equal(o.isnan(), outs[0].isnan())
               for o in outs)
    with torch.inference_mode():
        ref = m(x)
    assert rel_err(outs[0][0], ref[0]) < 1e-5
    assert sizes[0] < sizes[2] and sizes[1] < sizes[3]


@pytest.mark.parametrize("c,hw,k,s,act,residual", [(336, (14, 14), 3, 1, "relu", False),
                                                   (20, (13, 15), 3, 1, "relu6", True), (6, (7, 8), 3, 1, "none", False),
                                                   (5, (40, 16), 3, 1, "relu", True), (7, (3, 13), 3, 1, "none", True),
                                                   (4, (33, 45), 3, 1, "relu6", True), (3, (112, 112), 3, 1, "none", False),
                                                   (24, (14, 14), 5, 2, "relu", False), (5, (57, 45), 5, 2, "none", False),
                                                   (4, (112, 112), 3, 2, "relu6", False), (3, (27, 9), 5, 2, "relu", True)])
def test_depthwise_row_mode(c, hw, k, s, act, residual):
    """Depthwise convs in row mode on AVX-512 hosts (ConvPlan.dwrow: 3x3 stride 1 on maps > 6 wide, in chunks of
    16 columns past 16; 3x3 and 5x5 stride 2 in chunks of 14 output columns, the 5x5 ones without a phase
    split): bias, identity residual and
    activation in the epilogue, row blocks with a shorter last one, padding rows and columns skipped or masked,
    lanes past the width neither read nor written (the next conv reads the output's border). A zero weight
    times Inf is NaN as in PyTorch; the result equals the other modes' (dw_rows off) to rounding."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
            self.dw = nn.Conv2d(c, c, k, s, k // 2, groups=c)
            self.act = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "none": nn.Identity()}[act]
            self.post = nn.Conv2d(c, 4, 3, 1, 1)      # reads the output's border: it must stay zero

        def forward(self, x):
            x = self.pre(x)
            y = self.bn(self.dw(x))
            return self.post(self.act(y + x[:, :, ::s, ::s] if residual else y))

    torch.manual_seed(0)
    m = Net().eval()
    randomize_bn(m)
    with torch.no_grad():
        m.dw.weight[0, 0, 1, 1] = 0.0
    x = torch.randn(3, c, *hw)
    x[1, 0, 1, 2], x[2, c - 1, hw[0] - 1, hw[1] - 1] = float("nan"), float("inf")
    outs = []
    for opts in (PlanOptions(), PlanOptions(dw_rows=False)):
        e, st = compile(m, x[:1], threads=2, plan_options=opts, return_stages=True)
        modes = {cp.mode for cp in st.plan.convs.values()}
        if opts.dw_rows and e.spec["options"]["wide"] and (hw[1] > 6 or s == 2):
            assert "dwrow" in modes, modes
        elif not opts.dw_rows:
            assert "dwrow" not in modes
        with torch.inference_mode():
            outs.append(e(x))
    with torch.inference_mode():
        ref = m(x)
    for out in outs:
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        assert rel_err(out[0], ref[0]) < 1e-5
    assert rel_err(outs[0][0], outs[1][0]) < 1e-6


@pytest.mark.parametrize("c,cout,hw", [(40, 70, (7, 9)), (24, 16, (14, 14)), (300, 120, (1, 1))])
def test_squeeze_excite_multiply_fused_into_the_next_1x1_conv(c, cout, hw):
    """x * gate read by a dense 1x1 conv only: on hosts where dense convs run output-channel blocks (AVX-512) the
    multiply runs inside the conv (each channel's weights times the image's gate) and its input buffers must
    stay live until then; NaN/Inf in one image propagate as in PyTorch, the other image stays exact. A raw
    (unsquashed) gate too, and a product with a second reader, which must not be fused -- also when that reader
    takes it as a residual fused into its epilogue (a bottleneck's identity after squeeze-excite: fused, the
    product was never stored and the add read a stale buffer, found by the network fuzz, seed 121338)."""
    from sparseforge.engine.plan import _ochan

    class SE(nn.Module):
        def __init__(self, squash: bool, reread):
            super().__init__()
            self.pre, self.fc1, self.fc2 = nn.Conv2d(5, c, 3, padding=1), nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
            self.proj, self.proj2, self.post = nn.Conv2d(c, cout, 1), nn.Conv2d(c, cout, 1), nn.Conv2d(cout, 3, 3, 1, 1)
            self.proj3, self.proj4, self.post3 = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, 3, 3, 1, 1)
            self.squash, self.reread = squash, reread

        def forward(self, x):
            y = self.pre(x)
            g = self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True))))
            p = y * (torch.sigmoid(g) if self.squash else g)
            if self.reread == "residual":      # p is proj3's input and, fused into its epilogue, its residual
                return self.post3(torch.relu(self.proj3(p) + p))
            if self.reread == "later-residual":   # p is proj3's input and the residual of proj4 (a bottleneck)
                return self.post3(torch.relu(self.proj4(torch.relu(self.proj3(p))) + p))
            out = self.proj(p)          # not a graph output: its buffer may be any free one (not y's while y is read)
            return self.post(out + self.proj2(p) if self.reread else out)

    torch.manual_seed(0)
    for squash, reread in [(True, False), (False, False), (True, True), (True, "residual"), (True, "later-residual")]:
        m = SE(squash, reread).eval()
        x = torch.randn(2, 5, *hw)
        x[1, 2, 0, 0], x[1, 1, -1, -1] = float("nan"), float("inf")
        e, st = compile(m, x[:1], threads=2, return_stages=True)
        assert all(op["native"] for op in e.spec["ops"])
        fused = [cp for cp in st.plan.convs.values() if cp.in_scale >= 0]
        # the product's 1x1 conv in output-channel blocks (AVX-512, or AVX2 with more than a few input channels)
        ochan = [cp for cp in st.plan.convs.values() if cp.op.name in ("proj", "proj3") and cp.blk_ochan]
        assert len(fused) == (0 if reread or not ochan else 1), (squash, reread)
        if _ochan(st.plan.options, st.plan.vec, e.spec["options"]["wide"]) and c > 64:
            assert ochan
        with torch.inference_mode():
            out, ref = e(x), m(x)
        assert torch.equal(out[1].isnan(), ref[1].isnan()) and torch.equal(out[1].isinf(), ref[1].isinf())
        assert rel_err(out[0], ref[0]) < 1e-5, (squash, reread)


@pytest.mark.parametrize("form", ["method", "function", "function-keepdim"])
def test_mean_over_the_map_is_global_pooling(form):
    """``x.mean((2, 3))``, ``torch.mean(x, [-2, -1])`` (a (C,) vector straight into a linear layer) and the
    keepdim (C,1,1) form run as the native global average pool, not as PyTorch fallbacks."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 12, 3, 1, 1), nn.Linear(12, 5)

        def forward(self, x):
            y = torch.relu(self.c(x))
            if form == "method":
                return self.fc(y.mean((2, 3)))
            if form == "function":
                return self.fc(torch.mean(y, [-2, -1]))
            return self.fc(torch.mean(y, dim=(3, 2), keepdim=True).flatten(1))

    m = Net().eval()
    x = torch.randn(3, 3, 7, 9)
    e = compile(m, x[:1], threads=2)
    with torch.inference_mode():
        assert rel_err(e(x), m(x)) < 1e-5
    assert all(op["native"] for op in e.spec["ops"])


@pytest.mark.parametrize("primary_act", ["none", "relu"])
def test_batchnorm_behind_an_identity_is_not_folded_into_a_shared_producer(primary_act):
    """RepGhost's training form: bn(identity(x1)) beside dwconv(x1). The identity's node has one user, the value
    x1 two: folding that BatchNorm into x1's conv changed x1 for the depthwise branch (rel. error 0.2-0.3, no
    error raised) until only_user looked through aliases."""
    import sparseforge as sf

    torch.manual_seed(0)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 12, 3, 1, 1), ReuseBlock(12, 16, "relu", primary_act)))
    x = torch.randn(2, 3, 10, 9)
    e = compile(m, x[:1], threads=2)
    with torch.inference_mode():
        assert rel_err(e(x), m(x)) < 1e-5
    net = randomize_bn(sf.create_model("repghostnet", num_classes=10, width=0.5))     # unfolded
    x = torch.randn(2, 3, 32, 32)
    e = compile(net, x[:1], threads=2)
    with torch.inference_mode():
        assert rel_err(e(x), net(x)) < 1e-5


@pytest.mark.parametrize("act", ["relu", "hardswish"])
@pytest.mark.parametrize("through_identity", [False, True])
def test_in_place_activation_is_seen_by_later_readers(act, through_identity):
    """``z = relu_(y); proj(y) + z``: PyTorch's proj reads the overwritten y (rel. error 0.42 when the compiler
    read the value from before the in-place op), also when the in-place op writes through an identity alias."""
    torch.manual_seed(2)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 10, 3, 1, 1), InPlaceBlock(10, 12, act, through_identity)))
    x = torch.randn(2, 3, 9, 11)
    e = compile(m, x[:1], threads=2)
    with torch.inference_mode():
        assert rel_err(e(x), m(x)) < 1e-5

    class Methods(nn.Module):           # x.relu_() and x += y
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 3, 1, 1), nn.Conv2d(6, 6, 1)

        def forward(self, x):
            y = self.a(x)
            z = self.b(y)
            y.relu_()
            y += z
            return self.b(y) + z

    m = Methods().eval()
    e = compile(m, x[:1], threads=2)
    with torch.inference_mode():
        assert rel_err(e(x), m(x)) < 1e-5


SCHEDULES = [dict(thread_pool=True, claim_parts=True), dict(thread_pool=True, claim_parts=False),
             dict(thread_pool=False, claim_parts=True), dict(thread_pool=False, claim_parts=False)]


@pytest.mark.parametrize("threads", [2, 3])
def test_claimed_parts_equal_barriers(threads):
    """Every schedule -- claimed parts or barriers, on the library's own pool or in OpenMP regions -- must give
    the same bits, fused inverted-residual blocks with images left over after whole rounds included (their shared
    partial sums), call after call (claimed parts are tagged with the call's epoch: a stale tag would skip or
    repeat a part), and so must fewer threads at run time (``run_threads``)."""
    torch.manual_seed(1)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(),
                                   InvertedResidual(16, 48, 16, 1, "relu6", None),
                                   InvertedResidual(16, 64, 24, 1, "relu6", None), nn.Conv2d(24, 8, 1)))
    _prune_kernels(m, 1)
    x = torch.randn(threads + 1, 3, 16, 16)
    outs = []
    for sched in SCHEDULES:
        e = compile(m, x[:1], threads=threads, plan_options=PlanOptions(**sched))
        assert any("block" in op["describe"] for op in e.spec["ops"]), "the fused block path is not exercised"
        with torch.inference_mode():
            outs.append([e(x[:n]) for n in range(1, threads + 2)])
            for n, y in enumerate(outs[-1], 1):
                assert rel_err(y, m(x[:n])) < 1e-5
            for i in range(30):         # many calls in a row, batch sizes changing
                n = 1 + i % (threads + 1)
                assert torch.equal(e(x[:n]), outs[-1][n - 1]), (sched, i)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    e = compile(m, x[:1], threads=threads, plan_options=PlanOptions(claim_parts=True))
    e.run_threads = 1            # one thread takes every part: the same partitions, so the same bits
    assert "calls run on 1: run_threads" in e.summary(profile=False)
    with torch.inference_mode():
        for n, y in enumerate(outs[0], 1):
            assert torch.equal(e(x[:n]), y)
    for bad in (0, threads + 1, 1.0):
        with pytest.raises(SparseforgeError, match="run_threads must be"):
            e.run_threads = bad
    e = compile(m, x[:1], threads=threads, plan_options=PlanOptions(claim_parts=False))
    e.run_threads = 1
    with torch.inference_mode():
        for n, y in enumerate(outs[0], 1):
            assert torch.equal(e(x[:n]), y)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the engine's own pool is Linux's (elsewhere: OpenMP)")
def test_engine_pool_survives_fork_and_concurrent_callers():
    """The engine's own thread pool: a forked child (a DataLoader worker, a server's pre-fork) has none of the
    parent's workers and must start its own, not wait forever for them; two Python threads calling one engine
    at once are served one call at a time, each with its own right answer."""
    import multiprocessing as mp
    import threading

    torch.manual_seed(2)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(),
                                   nn.Conv2d(16, 8, 1)))
    _prune_kernels(m, 1)
    x = torch.randn(4, 3, 24, 24)
    e = compile(m, x[:1], threads=2)
    barriers = compile(m, x[:1], threads=2, plan_options=PlanOptions(claim_parts=False))   # waits for workers
    with torch.inference_mode():
        ref = [m(x[i:i + 1]) for i in range(4)]
        for eng in (e, barriers):
            assert rel_err(eng(x[:1]), ref[0]) < 1e-5        # the parent's workers exist from here on
    for eng in (e, barriers):
        q = mp.get_context("fork").Queue()
        p = mp.get_context("fork").Process(target=_fork_child, args=(eng, x, q))
        p.start()
        p.join(60)
        if p.is_alive():
            p.kill()
            pytest.fail("the forked child hung in the engine")
        assert q.get(timeout=5) < 1e-5
    errs: list[float] = []

    def caller(i: int) -> None:
        with torch.inference_mode():
            for _ in range(20):
                errs.append(rel_err(e(x[i:i + 1]), ref[i]))

    ts = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert len(errs) == 80 and max(errs) < 1e-5
    # idle workers leave after 2 s (a process compiling hundreds of engines keeps no thread for each), and a
    # later call starts them again
    import os
    import time

    def threads_now() -> int:
        return len(os.listdir("/proc/self/task"))

    busy = threads_now()
    time.sleep(3.0)
    idle = threads_now()
    assert idle <= busy - 2
    with torch.inference_mode():
        for eng in (e, barriers):
            assert rel_err(eng(x[1:2]), ref[1]) < 1e-5
    assert threads_now() >= idle + 2


def _fork_child(e, x, q) -> None:
    with torch.inference_mode():
        y = e(x[:2])
    q.put(0.0 if y.shape == (2, 8, 24, 24) and torch.isfinite(y).all() and rel_err(y[:1], e(x[:1])) < 1e-5 else 1.0)


class _ClampForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 3, 1, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        return torch.cat([torch.clamp(y, -0.2, 0.3), y.clamp(min=0.1), y.clip(max=-0.1),
                          F.hardtanh(self.b(y), -2.0, 0.5), F.leaky_relu(y, 0.2)], 1)


def test_leaky_relu_and_clamps_run_natively():
    """LeakyReLU, Hardtanh and clamp/clip with number bounds (one may be missing) are native element-wise ops;
    NaN passes through and Inf is clamped, as in PyTorch."""
    torch.manual_seed(3)
    for m in (nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(8, 6, 3, 1, 1), nn.Hardtanh()),
              _ClampForms()):
        m = randomize_bn(m.eval())
        x = with_nonfinite(torch.randn(2, 4, 7, 9), seed=4)
        e = compile(m, x[:1], threads=2)
        assert all(op["native"] for op in e.spec["ops"]), e.summary(profile=False)
        with torch.inference_mode():
            ok, why = compare_outputs(e(x), m(x), sparse=False)
        assert ok, why


NAN_NETS = {
    "conv-relu": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU6()),
    "conv-maxpool": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 1)),
    "narrow-map (flat mode)": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1)),
    "inverted block (fused)": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1),
                                                    InvertedResidual(8, 24, 8, 1, "relu6", None)),
    # a conv passes an Inf input on as +-Inf; PyTorch's GELU maps both to NaN (fuzz seed 41243)
    "7x7 stem + gelu": lambda: nn.Sequential(nn.Conv2d(4, 8, 7, 2, 3), nn.GELU()),
    "conv + silu": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.SiLU()),
    "conv + hardswish": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.Hardswish()),
}


@pytest.mark.parametrize("name", list(NAN_NETS))
@pytest.mark.parametrize("hw", [(4, 4), (8, 6), (16, 16)])
def test_nan_and_inf_propagate_as_in_pytorch(name, hw):
    torch.manual_seed(0)
    m = randomize_bn(NAN_NETS[name]())
    x = with_nonfinite(torch.randn(2, 4, *hw), seed=1)
    e = compile(m, x[:1], threads=2)
    with torch.inference_mode():
        ref, out = m(x), e(x)
    assert ref.isnan().any()
    ok, why = compare_outputs(out, ref, sparse=False)
    assert ok, why


def _pattern8(m: nn.Module) -> nn.Module:
    """``m`` in eval mode with random BN statistics, pruned to 8 patterns at connectivity 2 per layer, masks folded:
    the sparse networks the pattern-conv modes' tests run."""
    import sparseforge as sf
    from sparseforge.sparsity.mask import fold_masks

    m = randomize_bn(m.eval())
    sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=2.0, connectivity_scope="layer"))
    return fold_masks(m)


def _skip_without_avx2() -> None:
    from sparseforge.engine.build import AVX2_NEEDS
    from sparseforge.hardware import all_cpu_flags

    if not set(AVX2_NEEDS) <= set(all_cpu_flags()):
        pytest.skip("this CPU cannot run AVX2 code")


def test_avx2_builds_match_pytorch_and_save_what_they_need(tmp_path):
    """isa="avx2" builds the code an AVX2-only CPU runs (x86-64-v3, 8-float vectors, none of the AVX-512 modes)
    on any AVX2 host, so its paths are checked here too; its artefact asks the loading CPU for AVX2, not for this
    host's features, and loads back the same engine."""
    from sparseforge.engine import load_engine

    _skip_without_avx2()
    for seed in (3, 8, 13, 21):
        m, x, desc = random_network(seed)
        with torch.inference_mode():
            ref = m(x)
        e = compile(m, x[:1], threads=2, isa="avx2")
        assert "-march=x86-64-v3" in e.spec["build"]["flags"] and not e.spec["options"]["wide"]
        ok, why = compare_outputs(e(x), ref, sparse="sparsity dense" not in desc)
        assert ok, (seed, why, desc)
    e.save(tmp_path / "eng")
    import json
    assert json.loads((tmp_path / "eng" / "manifest.json").read_text())["cpu_flags_required"] == ["avx", "avx2", "fma"]
    again = load_engine(tmp_path / "eng")
    assert torch.equal(again(x), e(x))


def test_dense_convs_on_avx2_run_as_output_channel_halves():
    """Dense convs on 16-register (AVX2) builds run in output-channel blocks whose 16-filter vectors are two
    8-lane halves (ConvPlan.blk_lanes 8): a 7x7 stride-2 stem (phase split), 3x3 stride 1/2, 1x1 with and
    without a residual, a squeeze-excite gate fused into the 1x1 after it, odd filter counts (a partial last
    block), odd map sizes (shifted-back blocks), batch 1 and 3, NaN/Inf: as in PyTorch. With the default
    PlanOptions.blocked_kxk_max_work_narrow the k x k convs of at most 256 weights per output (the stem's 12 x
    16, 24 x 9) run in pixel-vector blocks instead, the others still in halves: as in PyTorch too."""
    _skip_without_avx2()
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 24, 7, 2, 3), nn.BatchNorm2d(24), nn.ReLU(),
                      BasicBlock(24, 40, 2, "relu", project=True), Bottleneck(40, 20, 40, 1, "relu", 1),
                      InvertedResidual(40, 72, 40, 1, "relu", "sigmoid"), nn.Conv2d(40, 19, 3, 1, 1))
    m = randomize_bn(m.eval())
    x = with_nonfinite(torch.randn(3, 3, 45, 39), seed=6)
    for isa, kxk in (("avx2", 0), ("portable", 0), ("avx2", None)):
        opts = PlanOptions() if kxk is None else PlanOptions(blocked_kxk_max_work_narrow=kxk)
        e, st = compile(m, x[:1], threads=2, isa=isa, return_stages=True, plan_options=opts)
        halves = [c for c in st.plan.convs.values() if c.blocked and c.blk_ochan and c.blk_lanes == 8]
        pixel = [c for c in st.plan.convs.values() if c.blocked and not c.blk_ochan]
        if kxk is None:
            work = {c.op.weight.shape[1] * c.op.weight.shape[2] ** 2 for c in pixel}
            assert pixel and max(work) <= 256 and 192 in work, e.summary(profile=False)
            assert all(c.op.weight.shape[1] * c.op.weight.shape[2] ** 2 > 256 or c.op.weight.shape[2] == 1
                       for c in halves)
        else:
            assert len(halves) >= 6 and all(c.op.weight.shape[1] * c.op.weight.shape[2] ** 2 <= 64 for c in pixel)
        assert any(c.in_scale >= 0 for c in halves), e.summary(profile=False)
        assert {c.op.weight.shape[2] for c in halves} >= {1, 3} and any(c.op.residual is not None for c in halves)
        with torch.inference_mode():
            for xb in (x[:1], x):
                ok, why = compare_outputs(e(xb), m(xb), sparse=False)
                assert ok, (isa, why)


def test_dense_convs_on_avx2_small_maps_run_in_channel_chunks():
    """Dense kxk convs in output-channel blocks on 16-register builds, on small maps, run their input channels in
    chunks with partial sums between chunks (PlanOptions.ochan_kchunk_narrow): channel counts that leave a
    partial last chunk, stride 1 and 2, a residual, a phase-split 5x5 stride-2 conv (two-phase channel groups),
    maps with shifted-back blocks, batch 1 and 3, NaN/Inf: as in PyTorch for chunks of 8 and 16 and none."""
    _skip_without_avx2()
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(3, 40, 3, 2, 1), nn.BatchNorm2d(40), nn.ReLU(),
                      BasicBlock(40, 40, 1, "relu", False), BasicBlock(40, 56, 2, "relu", project=True),
                      nn.Conv2d(56, 36, 5, 2, 2), nn.ReLU(), nn.Conv2d(36, 19, 3, 1, 1))
    m = randomize_bn(m.eval())
    x = with_nonfinite(torch.randn(3, 3, 27, 25), seed=9)
    with torch.inference_mode():
        ref = m(x)
    for isa, kc in (("avx2", 16), ("portable", 8), ("avx2", 0)):
        opts = PlanOptions(ochan_kchunk_narrow=kc)
        e, st = compile(m, x[:1], threads=2, isa=isa, return_stages=True, plan_options=opts)
        small = [c for c in st.plan.convs.values() if c.blocked and c.blk_ochan and c.blk_lanes == 8
                 and c.op.weight.shape[2] > 1 and c.ho * c.wo <= opts.ochan_kchunk_max_pixels]
        assert len(small) >= 4 and any(c.op.residual is not None for c in small), e.summary(profile=False)
        if kc:
            assert any(c.op.weight.shape[1] % kc for c in small) and any(c.op.stride == 1 and c.ho * c.wo < 60 for c in small)
            assert f"kc += {kc}" in st.source
        with torch.inference_mode():
            for xb in (x[:1], x):
                ok, why = compare_outputs(e(xb), ref[: len(xb)], sparse=False)
                assert ok, (isa, kc, why)


def test_sparse_flat_tiles_on_avx2_run_a_tap_at_a_time():
    """On 16-register (AVX2) builds a flat tile's accumulators plus a kernel's 4 weights outnumber the registers:
    the kernels run a tap at a time (PlanOptions.tap_major; tiles along the plane, not in row blocks); pattern 3x3 convs with and without a residual, an
    odd map, batch 1 and 2, NaN/Inf: as in PyTorch, and as the interleaved form."""
    _skip_without_avx2()
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1), nn.ReLU(), BasicBlock(24, 24, 1, "relu", False),
                      nn.Conv2d(24, 20, 3, 1, 1), nn.ReLU())
    m = _pattern8(m)
    x = with_nonfinite(torch.randn(2, 3, 61, 75), seed=3)
    outs = []
    for tm in (True, False):
        e, st = compile(m, x[:1], threads=2, isa="avx2", return_stages=True,
                        plan_options=PlanOptions(tap_major=tm, flat_rows_narrow=0))
        tiles = [c for c in st.plan.convs.values() if c.mode == "flat-tiled" and c.flat_tv >= 12]
        assert len(tiles) >= 2 and any(c.op.residual is not None for c in tiles), e.summary(profile=False)
        assert ("const vf k0 = BC(wp[0]); a0 +=" in st.source) == tm
        with torch.inference_mode():
            for xb in (x[:1], x):
                ok, why = compare_outputs(e(xb), m(xb), sparse=True)
                assert ok, (tm, why)
            outs.append(e(x))
    assert torch.equal(outs[0].isnan(), outs[1].isnan())


def test_sparse_flat_tiles_on_avx2_run_in_packed_row_blocks():
    """On 16-register (AVX2) builds, pattern 3x3 convs on maps whose rows are whole vectors run in 2-D flat tiles
    (PlanOptions.flat_rows_narrow): rows x vectors from each row's left border, a kernel's taps column by column,
    each tile's input packed per thread into aligned rows (flat_pack_narrow), in channel blocks where the packed
    window outgrows L1. Maps the tiles do not divide (shifted-back tiles), a residual, channel blocks, batch 1
    (threads split the tiles) and 3 (an image per thread, then the rest split), NaN/Inf: as in PyTorch packed and
    unpacked, with NaN/Inf where the tiles along the plane put them."""
    _skip_without_avx2()
    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(3, 48, 3, 1, 1), nn.ReLU(), BasicBlock(48, 48, 1, "relu", False),
                      nn.Conv2d(48, 40, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(40, 24, 3, 1, 1))
    m = _pattern8(m)
    x = with_nonfinite(torch.randn(3, 3, 61, 75), seed=5)
    with torch.inference_mode():
        ref = m(x)
    outs = []
    for opts in (PlanOptions(), PlanOptions(flat_pack_narrow=False), PlanOptions(flat_rows_narrow=0)):
        e, st = compile(m, x[:1], threads=2, isa="avx2", return_stages=True, plan_options=opts)
        rows = [c for c in st.plan.convs.values() if c.mode == "flat-tiled" and c.flat_rt]
        if opts.flat_rows_narrow:
            assert len(rows) >= 3 and any(c.op.residual is not None for c in rows), e.summary(profile=False)
            assert all(2 <= c.flat_rt and 8 <= c.flat_rt * c.flat_tv <= opts.flat_rows_narrow for c in rows)
            assert any(c.ho % c.flat_rt or c.flat_jn % c.flat_tv for c in rows)       # shifted-back tiles
            assert all(c.flat_pack == opts.flat_pack_narrow for c in rows)
            assert any(c.flat_cb for c in rows) and any(c.spatial for c in rows)
            assert ("float* P = S + " in st.source) == opts.flat_pack_narrow
        else:
            assert not rows
        with torch.inference_mode():
            for xb in (x[:1], x):
                ok, why = compare_outputs(e(xb), ref[: len(xb)], sparse=True)
                assert ok, (opts, why)
            outs.append(e(x))
    assert torch.equal(outs[0].isnan(), outs[2].isnan()) and torch.equal(outs[1].isnan(), outs[2].isnan())


def test_flat_spans_align_the_busiest_kernel_column():
    """_flat_span starts a flat span where the taps of column offset dx load aligned vectors, at most vec - 1
    positions before the first interior one (rows whole vectors; else at it), and covers the last interior
    position; _busiest_column counts taps per kernel column over the layer's kernels (phase taps included)."""
    import numpy as np

    from sparseforge.engine.plan import _busiest_column, _flat_span

    for vec in (8, 16):
        for rs, ho, wo in ((16, 14, 14), (32, 28, 28), (64, 56, 50), (128, 112, 112), (30, 28, 28)):
            for dx in (-1, 0, 1, 2, None):
                p0, nv = _flat_span(rs, ho, wo, vec, dx)
                assert p0 <= rs + 1 < p0 + vec and p0 + nv * vec > ho * rs + wo >= p0 + (nv - 1) * vec
                if dx is not None and rs % vec == 0:
                    assert (p0 + dx) % vec == 0, (vec, rs, dx, p0)
                else:
                    assert p0 == rs + 1
    shapes = [(0, 3, 4, 5), (4, 7)]             # columns 0, 0, 1, 2 and 1, 1
    assert _busiest_column(shapes, np.array([0, 1, 1]), 3, 3, 1) == 0        # 2 / 5 / 1 taps: the centre
    assert _busiest_column(shapes, np.array([0, 0, 0, 1]), 3, 3, 1) == -1    # 6 / 5 / 3
    assert _busiest_column([(1, 3, 5, 7)], np.array([0]), 2, 2, 0) == 1      # phase taps: columns 1, 1, 1, 1


def test_flat_row_tiles_fit_the_registers_and_split_evenly():
    """_flat_rows_shape: at most ``acc`` accumulators, at least 8 (latency-bound chains) unless the map holds fewer
    vectors, two or more rows (rows are what share loads), and, with threads splitting the tiles, no shape whose
    last thread's share costs more than another's: the 2x2-tile 14x14 case that left one of 2 threads idle."""
    from sparseforge.engine.plan import _flat_rows_shape

    for ho in (2, 3, 7, 14, 28, 56, 61, 112):
        for jn in (1, 2, 4, 8, 10, 15):
            for threads in (1, 2, 4):
                rt, tv = _flat_rows_shape(ho, jn, 12, threads, 1000, 64)
                assert 2 <= rt <= ho and 1 <= tv <= jn and rt * tv <= max(12, ho * jn if ho * jn < 8 else 12)
                assert rt * tv >= min(8, ho * jn), (ho, jn, rt, tv)
    assert _flat_rows_shape(14, 2, 12, 2, 16384, 256) != (5, 2)     # 3 tiles on 2 threads
    assert _flat_rows_shape(112, 15, 12, 2, 4096, 128) == (4, 3)     # measured best of 6x2, 4x3, 3x4, 2x6


def test_gather_rows_on_avx2_run_a_few_vectors_at_a_time():
    """Gather mode on 16-register (AVX2 and portable) builds loads a shape's packed rows a few vectors at a time
    (PlanOptions.gather_rows_narrow), every filter of the list passing over each group: maps whose vector count
    is not a multiple of the group (7x7: 7 vectors, 5x3: 2), a stride-2 conv, a residual, batch 1 and 3, NaN/Inf:
    as in PyTorch for groups of 1, 2 and 3 vectors and for all rows at once, with a thread's filters in one tile
    (the default there, PlanOptions.gather_acc_bytes_narrow) and in tiles of a few filters."""
    _skip_without_avx2()
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), BasicBlock(32, 40, 2, "relu", project=True),
                      BasicBlock(40, 40, 1, "relu", False), nn.MaxPool2d((2, 3)), nn.Conv2d(40, 24, 3, 1, 1))
    m = _pattern8(m)
    x = with_nonfinite(torch.randn(3, 3, 28, 37), seed=8)
    with torch.inference_mode():
        ref = m(x)
    for isa, gv, acc, inline in (("avx2", 2, None, True), ("avx2", 1, 1024, True), ("portable", 3, None, True),
                                 ("avx2", 0, 2048, True), ("avx2", 2, None, False), ("avx2", 1, 1024, False)):
        kw = {} if acc is None else {"gather_acc_bytes_narrow": acc}
        e, st = compile(m, x[:1], threads=2, isa=isa, conv_mode="gather", return_stages=True,
                        plan_options=PlanOptions(gather_rows_narrow=gv, gather_inline_pack=inline, **kw))
        gathers = [c for c in st.plan.convs.values() if c.mode == "gather"]
        assert st.plan.narrow and len(gathers) >= 4, e.summary(profile=False)
        assert all(c.gather_inline == inline for c in gathers)
        assert any(c.gather_pv % 2 for c in gathers) and any(c.op.residual is not None for c in gathers)
        # one tile per thread by default; small accumulator budgets cut the lists into several
        fts = [(c.gather_ft, c.op.weight.shape[0]) for c in gathers]
        assert all(ft >= o for ft, o in fts) if acc is None else any(2 * ft < o for ft, o in fts), (acc, fts)
        with torch.inference_mode():
            for xb in (x[:1], x):
                ok, why = compare_outputs(e(xb), ref[: len(xb)], sparse=True)
                assert ok, (isa, gv, why)


def test_gather_tiles_on_avx512_hosts_hold_a_threads_filters():
    """Gather mode on 32-register (AVX-512) hosts: a thread's filters in one tile of accumulators (the default,
    PlanOptions.gather_acc_bytes) or, with a small budget, in several; 7x7 and odd maps, stride 2, a residual,
    batch 1 and 3, NaN/Inf: as in PyTorch either way, with each channel's rows packed in the tiles' channel loop
    (PlanOptions.gather_inline_pack, then once per tile) or all up front."""
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), BasicBlock(32, 130, 2, "relu", project=True),
                      BasicBlock(130, 130, 1, "relu", False), nn.MaxPool2d((2, 3)), nn.Conv2d(130, 24, 3, 1, 1))
    m = _pattern8(m)
    x = with_nonfinite(torch.randn(3, 3, 28, 27), seed=9)
    with torch.inference_mode():
        ref = m(x)
    for acc, inline in ((None, True), (1024, True), (None, False), (1024, False)):
        kw = {} if acc is None else {"gather_acc_bytes": acc}
        e, st = compile(m, x[:1], threads=2, conv_mode="gather", return_stages=True,
                        plan_options=PlanOptions(gather_inline_pack=inline, **kw))
        if st.plan.narrow:
            pytest.skip("this CPU has no AVX-512 (16-register plans: test_gather_rows_on_avx2_run_a_few_vectors_at_a_time)")
        gathers = [c for c in st.plan.convs.values() if c.mode == "gather"]
        assert len(gathers) >= 4 and any(c.op.residual is not None for c in gathers), e.summary(profile=False)
        fts = [(c.gather_ft, -(-c.op.weight.shape[0] // 2)) for c in gathers]     # (tile, filters per thread)
        assert all(ft >= o for ft, o in fts) if acc is None else any(2 * ft < o for ft, o in fts), (acc, fts)
        with torch.inference_mode():
            for xb in (x[:1], x):
                ok, why = compare_outputs(e(xb), ref[: len(xb)], sparse=True)
                assert ok, (acc, inline, why)


@pytest.mark.parametrize("mode", ["gather", "packed1"])
@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_kernel_entry_prefetch_changes_no_bit(isa, mode):
    """Gather and packed 1x1 modes prefetch their kernel entries ``gather_prefetch`` / ``packed1_prefetch`` ahead
    (PlanOptions): the loops carry the prefetches only with the knob on, and both engines give the same bits,
    NaN and Inf included."""
    if isa == "avx2":
        _skip_without_avx2()
    torch.manual_seed(7)
    if mode == "gather":
        m = _pattern8(nn.Sequential(nn.Conv2d(3, 130, 3, 2, 1), nn.ReLU(), BasicBlock(130, 130, 1, "relu", False)))
        marks = ("__builtin_prefetch(we + 32)", "__builtin_prefetch(wg + 32)")
    else:     # a bottleneck's 1x1 convs on a 7x8 map (packed: at most packed1_max pixels)
        m = _pattern8(nn.Sequential(nn.Conv2d(3, 96, 3, 2, 1), nn.ReLU(), Bottleneck(96, 40, 96, 1, "relu", 1)))
        with torch.no_grad():         # 1x1 weights 80% zero (pattern pruning leaves them dense)
            for c in m.modules():
                if isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1):
                    c.weight.mul_((torch.rand_like(c.weight) < 0.2).float())
        marks = ("__builtin_prefetch(w + e + 8)",)
    x = with_nonfinite(torch.randn(3, 3, 14, 15), seed=5)
    knob, conv_mode = {"gather": ("gather_prefetch", "gather"), "packed1": ("packed1_prefetch", "auto")}[mode]
    outs = []
    for d in (0, 8):
        e, st = compile(m, x[:1], threads=2, isa=isa, conv_mode=conv_mode, return_stages=True,
                        plan_options=PlanOptions(**{knob: d}))
        assert any(c.mode == mode for c in st.plan.convs.values())
        assert any(mk in st.source for mk in marks) == (d == 8)
        with torch.inference_mode():
            outs.append(e(x))
    assert torch.equal(outs[0].nan_to_num(nan=7.0), outs[1].nan_to_num(nan=7.0))
    with torch.inference_mode():
        ok, why = compare_outputs(outs[1], m(x), sparse=True)
    assert ok, why


def test_isa_choices_are_checked():
    from sparseforge.engine.build import AVX2_NEEDS
    from sparseforge.hardware import all_cpu_flags

    m, x, _ = random_network(3)
    cases = [({"isa": "avx3"}, "isa must be one of"), ({"isa": "avx2", "portable": True}, "disagree")]
    if set(AVX2_NEEDS) <= set(all_cpu_flags()):
        cases.append(({"isa": "avx2", "vector_width": 16}, "AVX-512"))
    else:                                   # a CPU without AVX2 is told so, in one line
        cases.append(({"isa": "avx2"}, "needs a CPU with"))
    for kw, match in cases:
        with pytest.raises(SparseforgeError, match=match):
            compile(m, x[:1], **kw)


@pytest.mark.slow
def test_generated_networks_match_pytorch():
    """CI_NETWORKS random whole networks; every other one with a NaN and an Inf in its input."""
    failures = []
    for seed in range(CI_NETWORKS):
        m, x, desc = random_network(seed)
        sparse = "sparsity dense" not in desc
        if seed % 2:
            m = nn.Sequential(m.stem, m.blocks).eval()      # feature maps, where NaN stays local
            x = with_nonfinite(x, seed)
        with torch.inference_mode():
            ref = m(x)
        e = compile(m, x[:1], threads=1 + seed % 3)
        ok, why = compare_outputs(e(x), ref, sparse=sparse)
        if not ok:
            failures.append(f"seed {seed}: {why}: {' | '.join(desc)}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("name,sparsity", [("resnet18", "pattern8x"), ("resnet50", "dense"),
                                           ("mobilenet_v2", "pattern8x"), ("vgg16_bn", "pattern8x"),
                                           ("shufflenet_v2_x1_0", "pattern8x")])
def test_imagenet_zoo_through_the_engine(name, sparsity):
    """The networks people ship, at 224x224 with non-trivial BN statistics: correct, and no PyTorch fallback
    (ResNet's 7x7 stride-2 stem runs as a phase split and a 4x4 conv in blocked mode; ShuffleNetV2's chunks and
    shuffles as channel gathers)."""
    import sparseforge as sf

    torch.manual_seed(0)
    m = randomize_bn(sf.create_model(name))
    if sparsity != "dense":
        sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=3.6))
    x = torch.randn(2, 3, 224, 224)
    e = compile(m, x[:1], threads=2)
    with torch.inference_mode():
        assert rel_err(e(x), m(x)) < 1e-4
    fallbacks = [op["describe"] for op in e.spec["ops"] if not op["native"]]
    assert not fallbacks, fallbacks


@pytest.mark.parametrize("mode", ["max", "avg", "avg-exclude-pad"])
def test_pools_every_window_stride_and_padding(mode):
    """Pools run as vectors over a row buffer padded with identity lanes (stride 1 shifted loads, stride 2 even
    lanes): every window/stride/padding, odd and even sizes, NaN and Inf inputs, against PyTorch."""
    torch.manual_seed(0)
    for k, s, p, (h, w) in [(2, 2, 0, (16, 17)), (3, 2, 1, (23, 17)), (3, 1, 1, (9, 32)), (3, 2, 0, (16, 16)),
                            (5, 2, 2, (21, 11)), (2, 1, 0, (7, 5)), (3, 3, 1, (17, 23)), (5, 1, 2, (8, 40))]:
        pool = (nn.MaxPool2d(k, s, p) if mode == "max"
                else nn.AvgPool2d(k, s, p, count_include_pad=mode == "avg"))
        m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), pool, nn.Conv2d(5, 4, 1)).eval()
        x = torch.randn(2, 3, h, w)
        x[0, 1, 2, 3], x[1, 0, h - 1, w - 2] = float("nan"), float("inf")
        e = compile(m, x[:1], threads=2)
        assert e.spec["ops"][1]["native"], (k, s, p)
        with torch.inference_mode():
            assert torch.allclose(e(x), m(x), rtol=1e-5, atol=1e-5, equal_nan=True), (k, s, p, h, w)


def test_max_pool_3x3_stride2_in_registers_matches_pytorch():
    """ResNet's 3x3 stride-2 max pool runs in registers (PlanOptions.pool_max_3s2: even/odd lanes of two input
    vectors, the odd lanes moved up one for column 2x-1): even and odd widths whose last window is clipped,
    maps of negative values (a zero border must never win), NaN/Inf on every edge, batch 1 and 3 (the batch's
    leftover image split by channels), native, AVX2 and portable builds; with the knob off the row-buffer kernel
    runs and agrees."""
    torch.manual_seed(3)
    for isa in ("native", "avx2", "portable"):
        if isa == "avx2":
            from sparseforge.engine.build import AVX2_NEEDS
            from sparseforge.hardware import all_cpu_flags
            if not set(AVX2_NEEDS) <= set(all_cpu_flags()):
                continue
        for h, w in ((112, 112), (33, 41), (20, 64), (9, 113)):
            conv = nn.Conv2d(3, 6, 3, padding=1)
            nn.init.constant_(conv.bias, -30.0)
            m = nn.Sequential(conv, nn.MaxPool2d(3, 2, 1), nn.Conv2d(6, 4, 1)).eval()
            x = torch.randn(3, 3, h, w)
            for (n, c, y, xx), v in (((0, 0, 0, 0), "nan"), ((1, 1, h - 1, w - 1), "inf"), ((2, 2, h // 2, w - 1), "-inf"),
                                     ((0, 1, h - 1, 0), "nan"), ((1, 2, 0, w // 2), "nan")):
                x[n, c, y, xx] = float(v)
            with torch.inference_mode():
                ref = m(x)
                for on in (True, False):
                    e, st = compile(m, x[:1], threads=2, isa=isa, return_stages=True,
                                    plan_options=PlanOptions(pool_max_3s2=on))
                    assert ("op1_mx(" in st.source) == on, (isa, h, w, on)
                    for xb, rb in ((x[:1], ref[:1]), (x, ref)):
                        ok, why = compare_outputs(e(xb), rb, sparse=False)
                        assert ok, (isa, h, w, on, len(xb), why)


def test_split_build_equals_single_unit(tmp_path, monkeypatch):
    """The build may compile conv bodies in separate processes and link them: the library computes the same."""
    from sparseforge.engine.build import build, split_units

    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    m = nn.Sequential(BasicBlock(8, 16, 2, "relu", project=True), BasicBlock(16, 16, 1, "relu", project=False),
                      nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU()).eval()
    randomize_bn(m, seed=0)
    x = torch.randn(2, 8, 16, 16)
    e, st = compile(m, x[:1], threads=2, return_stages=True)
    header, units, main = split_units(st.source)
    from sparseforge.engine.codegen import MAIN_MARK, UNIT_MARK

    assert len(units) >= 2 and "BODY void conv" in header
    assert header + "".join(units) + main == st.source.replace(UNIT_MARK, "").replace(MAIN_MARK, "")
    outs = []
    for jobs in (1, 3):
        lib, info = build(st.source + f"\n/* jobs {jobs} */\n", jobs=jobs)   # distinct cache entries
        assert not info["cached"]
        from sparseforge.engine.runtime import CompiledModel
        outs.append(CompiledModel(e.spec, lib, st.plan.blob.floats(), st.plan.blob.ints(), {}, st.source)(x))
    assert torch.equal(outs[0], outs[1])
    with torch.inference_mode():
        assert rel_err(outs[0], m(x)) < 1e-5


@pytest.mark.parametrize("mode,kernel", [pytest.param("blocked", "host", marks=pytest.mark.slow), ("auto", "host"),
                                         ("blocked", "pixel"), ("blocked", "ochan")])
def test_blocked_mode_dense_layers(mode, kernel):
    """Blocked mode (dense layers: register blocks, last blocks shifted back), in both kernels whatever the host:
    pixel vectors (F filters x rows x vectors) and output-channel vectors (16 filters x rows x pixels; forced by
    16-lane plans): kernel 1/3 and 7x7 stride 2 (a phase split and a 4x4 conv), stride 1/2, padding 0/1, odd
    sizes and filter counts (a partial last block of filters), maps narrower than a block, residual, NaN/Inf,
    against PyTorch; auto picks it for dense convs."""
    from sparseforge.engine import PlanOptions

    kw = {"host": {}, "pixel": {"plan_options": PlanOptions(blocked_ochan=False)}, "ochan": {"vector_width": 16}}[kernel]
    torch.manual_seed(0)
    for cin, cout, k, s, p, (h, w) in [(3, 5, 3, 2, 1, (23, 17)), (8, 16, 1, 1, 0, (7, 5)), (17, 16, 3, 1, 1, (16, 32)),
                                       (8, 7, 3, 2, 0, (16, 9)), (16, 13, 1, 2, 0, (15, 30)), (4, 16, 3, 1, 0, (9, 40)),
                                       (3, 33, 7, 2, 3, (29, 26)), (5, 18, 3, 1, 1, (3, 2)), (24, 40, 1, 1, 0, (5, 19)),
                                       (33, 70, 1, 2, 0, (9, 14)), (300, 120, 1, 1, 0, (1, 1)), (24, 40, 1, 1, 0, (7, 7))]:
        m = randomize_bn(nn.Sequential(nn.Conv2d(cin, cout, k, s, p), nn.BatchNorm2d(cout), nn.ReLU()), seed=k + s)
        x = torch.randn(3, cin, h, w)
        x[1, 0, h // 2, w // 2], x[2, cin - 1, 0, w - 1] = float("nan"), float("inf")
        e, st = compile(m, x[:1], threads=2, conv_mode=mode, return_stages=True, **kw)
        assert any(c.blocked for c in st.plan.convs.values()), (cin, cout, k, s, p)
        if kernel != "host":
            assert all(c.blk_ochan == (kernel == "ochan") for c in st.plan.convs.values() if c.blocked)
        if kernel == "ochan" and (h, w) == (1, 1):      # a 1x1 map: four vectors of filters share each broadcast
            assert [c.blk_f for c in st.plan.convs.values() if c.blocked] == [64]
        with torch.inference_mode():
            out, ref = e(x), m(x)
        assert torch.equal(out.isnan(), ref.isnan()), (cin, cout, k, s, p, h, w)
        assert rel_err(out.nan_to_num(), ref.nan_to_num()) < 1e-5, (cin, cout, k, s, p, h, w)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), BasicBlock(16, 32, 2, "relu", project=True),
                                   BasicBlock(32, 32, 1, "relu", project=False)), seed=3)
    x = torch.randn(2, 3, 20, 24)
    e = compile(m, x[:1], threads=3, conv_mode=mode, **kw)
    with torch.inference_mode():
        assert rel_err(e(x), m(x)) < 1e-5


@pytest.mark.parametrize("mode", ["auto", pytest.param("direct", marks=pytest.mark.slow), "blocked"])
def test_kxk_convs_run_natively(mode):
    """5x5/7x7 convs, stride 1/2, padding up to k // 2 (ResNet's 7x7 s2 p3 stem): lowered to a phase split and an
    unpadded stride-1 conv that never multiplies the split's structural zeros (NaN/Inf stay where PyTorch has
    them); a depthwise one with stride 2 (RepGhost's 5x5 s2 p2) to a grouped conv over each channel's phases."""
    torch.manual_seed(0)
    for k, s, p, dw in [(7, 2, 3, False), (5, 2, 1, False), (5, 2, 2, False), (7, 1, 3, False), (5, 1, 2, True),
                        (3, 1, 1, False), (7, 2, 0, False), (5, 2, 2, True), (7, 2, 3, True)]:
        conv = nn.Conv2d(6, 6 if dw else 16, k, s, p, groups=6 if dw else 1)
        m = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(),
                                       nn.MaxPool2d(3, 2, 1), nn.Conv2d(conv.out_channels, 4, 1)), seed=k)
        x = torch.randn(2, 6, 29, 22)
        x[0, 1, 5, 7], x[1, 3, 20, 2] = float("nan"), float("inf")
        e = compile(m, x[:1], threads=2, conv_mode=mode)
        assert all(op["native"] for op in e.spec["ops"]), (k, s, p, dw)
        with torch.inference_mode():
            out, ref = e(x), m(x)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5, equal_nan=True), (k, s, p, dw)


@pytest.mark.parametrize("vw", [None, 16])
def test_channel_block_16_runs_as_output_channel_vectors(vw):
    """channel_block=16 pruning: each block of 16 filters shares its kept kernels and patterns, so the engine runs
    the block's kept kernels only, 16 filters per vector (AVX-512 hosts; forced by 16-lane plans on any host):
    3x3 and 1x1, stride 1/2, residuals, a partial last block (40 filters), both epilogues (rows of 16 pixels
    transposed in registers, and shorter blocks by masked row stores (AVX-512 builds) or through a buffer), batch > 1, NaN/Inf; a layer whose blocks
    do not share kernels runs in the per-filter modes."""
    import sparseforge as sf
    from sparseforge.engine.plan import _ochan32
    from sparseforge.engine.testing import random_bn_statistics
    from sparseforge.sparsity.mask import fold_masks

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 40, 3, 1, 1), nn.BatchNorm2d(40), nn.ReLU(),
                      BasicBlock(40, 48, 2, "relu", project=True), BasicBlock(48, 48, 2, "relu", project=True),
                      nn.Conv2d(48, 40, 1), nn.BatchNorm2d(40), nn.ReLU(), nn.Conv2d(40, 40, 3, 1, 1))
    m = random_bn_statistics(m.eval(), torch.Generator().manual_seed(1))
    sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=3.6, channel_block=16, connectivity_scope="layer"))
    with torch.no_grad():        # the last conv: per-filter kernels (blocks share nothing)
        m[8].weight.mul_((torch.rand(40, 40, 1, 1) < 0.2).float())
    m = fold_masks(m)
    x = torch.randn(3, 3, 40, 36)
    x[1, 0, 13, 9], x[2, 2, 30, 11] = float("nan"), float("inf")
    e, st = compile(m, x[:1], threads=2, return_stages=True, vector_width=vw)
    ochan = _ochan32(st.plan.options, st.plan.vec, e.spec["options"]["wide"])
    sparse = [c for c in st.plan.convs.values() if c.blk_sparse]
    if ochan:
        assert len(sparse) >= 5 and any(c.op.residual is not None for c in sparse)
        assert {(c.rows, c.vecs) == (1, 16) for c in sparse} == {True, False}      # both epilogues
        assert any(c.op.stride == 2 for c in sparse) and any(c.op.weight.shape[2] == 1 for c in sparse)
        assert not any(c.blk_sparse for k, c in st.plan.convs.items() if c.op.name.endswith("8"))
    else:
        assert not sparse
    with torch.inference_mode():
        out, ref = e(x), m(x)
    ok, why = compare_outputs(out, ref, sparse=True)
    assert ok and (~out.isfinite()).any(), why


@pytest.mark.parametrize("cb", [pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_channel_block_filters_run_as_groups(cb):
    """channel_block pruning (adjacent filters share pattern and kept kernels): the engine runs such filters as
    groups (each input vector loaded once for the group) in direct, flat and tiled-flat modes, with residuals,
    stride 2, batch > 1 and NaN/Inf inputs; unstructured layers are not grouped."""
    import sparseforge as sf
    from sparseforge.engine.testing import random_bn_statistics
    from sparseforge.sparsity.mask import fold_masks

    def wide_net():      # 64-channel 48x44 maps: large enough for the tiled flat mode, quick to compile
        return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
                             BasicBlock(32, 64, 2, "relu", project=True), BasicBlock(64, 64, 1, "relu", project=False),
                             nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), nn.ReLU())

    modes = set()
    for name, shape in [("wide", (2, 3, 96, 88)), ("resnet20", (3, 3, 16, 16))]:
        torch.manual_seed(cb)
        m = wide_net() if name == "wide" else sf.create_model(name, num_classes=10)
        m = random_bn_statistics(m.eval(), torch.Generator().manual_seed(cb))
        sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=3.6, channel_block=cb))
        m = fold_masks(m)
        x = torch.randn(shape)
        x[1, 0, 13, 9] = float("nan")
        x[0, 2, 10, 11] = float("inf")
        e, st = compile(m, x[:1], threads=2, return_stages=True)
        grouped = [c for c in st.plan.convs.values() if c.fgroup > 1]
        modes |= {c.mode for c in grouped}
        assert any(c.op.residual is not None for c in grouped), name
        with torch.inference_mode():
            out, ref = e(x), m(x)
        ok, why = compare_outputs(out, ref, sparse=True)     # a pruned weight is absent: 0 * NaN is not taken
        assert ok and out.isfinite().any() and (~out.isfinite()).any(), (name, why)
        _prune_kernels(m, seed=cb)          # unstructured kernels: no groups
        e2, st2 = compile(m, x[:1], threads=2, return_stages=True)
        assert all(c.fgroup == 1 for c in st2.plan.convs.values()), name
        with torch.inference_mode():
            ok, why = compare_outputs(e2(x), m(x), sparse=True)
        assert ok, (name, why)
    assert modes == {"flat-tiled", "flat", "direct"}, modes


def test_1x1_convs_run_flat_tiled_on_any_map():
    """Stride-1 1x1 convs run in tiled flat mode whatever the map size (every kept weight of a filter feeds a
    tile of vectors along the flattened plane), on AVX-512 hosts with 16-lane tiles inside the 8-lane plan, rows
    a multiple of 8 or 16; residual adds, ReLU6, odd sizes, batch > 1 and NaN/Inf stay as in PyTorch."""
    import sparseforge as sf
    from sparseforge.engine.testing import random_bn_statistics
    from sparseforge.sparsity.mask import fold_masks

    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1), nn.BatchNorm2d(24), nn.ReLU6(),
                      Bottleneck(24, 40, 72, 1, "relu6", 1), Bottleneck(72, 24, 72, 1, "relu", 1),
                      nn.Conv2d(72, 33, 1), nn.BatchNorm2d(33), nn.ReLU())
    m = random_bn_statistics(m.eval(), torch.Generator().manual_seed(3))
    sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=3.6, connectivity_scope="layer"))
    m = fold_masks(m)
    x = torch.randn(3, 3, 19, 26)
    x[1, 0, 13, 9], x[2, 2, 3, 11] = float("nan"), float("inf")
    e, st = compile(m, x[:1], threads=2, return_stages=True)
    ones = [c for c in st.plan.convs.values() if c.op.weight.shape[2:] == (1, 1)]
    # six 1x1 convs, the first block's conv3 and projection shortcut stacked into one (PlanOptions.fuse_projection)
    assert len(ones) == 5 and all(c.mode == "flat-tiled" for c in ones), [c.mode for c in ones]
    assert any(c.op.residual is not None for c in ones)
    assert {c.vec for c in ones} == ({16} if e.spec["options"]["wide"] else {st.plan.vec})
    with torch.inference_mode():
        out, ref = e(x), m(x)
    ok, why = compare_outputs(out, ref, sparse=True)
    assert ok and (~out.isfinite()).any(), why


@pytest.mark.parametrize("channel_block,merged", [(1, True), (2, True), (1, False), (2, False)])
def test_flat_tiles_in_channel_blocks_match_pytorch(channel_block, merged):
    """Flat-tiled convs whose tile input outgrows PlanOptions.flat_cblock_bytes run their kernels in blocks of
    input channels, partial sums in scratch between blocks. Forced here with a tiny budget (many blocks, an
    uneven last one, blocks a filter keeps no kernel in), on 3x3 and 1x1 convs, residual adds, filter groups
    (channel_block 2), batch 1 (threads split tiles) and 3 (an image per thread), NaN/Inf, kernels in one
    merged stream or per-shape arrays (PlanOptions.merged_runs): as in PyTorch."""
    import sparseforge as sf
    from sparseforge.engine.plan import PlanOptions
    from sparseforge.engine.testing import random_bn_statistics
    from sparseforge.sparsity.mask import fold_masks

    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 40, 3, 1, 1), nn.BatchNorm2d(40), nn.ReLU(),
                      BasicBlock(40, 40, 1, "relu", False), Bottleneck(40, 36, 72, 1, "relu6", 1),
                      nn.Conv2d(72, 34, 3, 1, 1), nn.BatchNorm2d(34), nn.ReLU())
    m = random_bn_statistics(m.eval(), torch.Generator().manual_seed(5))
    sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=3.6, connectivity_scope="layer",
                                 channel_block=channel_block))
    m = fold_masks(m)
    x = torch.randn(3, 3, 47, 45)
    x[1, 0, 13, 9], x[2, 2, 3, 11] = float("nan"), float("inf")
    # the tiny budget that gives many blocks and an uneven last one depends on the tile width (vector lanes):
    # the first of a few that does on this host
    for budget in (1 << 13, 7 << 10, 6 << 10, 5 << 10, 3 << 10):
        opts = PlanOptions(flat_tiled_min_bytes=1 << 12, flat_cblock_bytes=budget, merged_runs=merged)
        e, st = compile(m, x[:1], threads=2, return_stages=True, plan_options=opts)
        blocked = [c for c in st.plan.convs.values() if c.flat_ncb > 1]
        if len(blocked) >= 5 and (channel_block > 1 or any(c.op.weight.shape[1] % c.flat_cb for c in blocked)):
            break
    assert all(c.merged == merged for c in blocked)
    assert len(blocked) >= 5 and all(c.mode == "flat-tiled" for c in blocked)
    assert any(c.op.residual is not None for c in blocked) and any(c.kh == 3 for c in blocked)
    if channel_block == 1:
        assert any(c.op.weight.shape[1] % c.flat_cb for c in blocked)    # an uneven last block (7 x 6 for 40)
    else:
        assert any(c.fgroup == 2 for c in blocked)
    with torch.inference_mode():
        for xb in (x[:1], x):
            out, ref = e(xb), m(xb)
            ok, why = compare_outputs(out, ref, sparse=True)
            assert ok, why
    assert (~e(x).isfinite()).any()


@pytest.mark.parametrize("hw", [(28, 28), (57, 45), (64, 62)])
def test_sparse_stride2_convs_lowered_to_a_phase_split_match_pytorch(hw):
    """Sparse 3x3 stride-2 convs on large inputs become a phase split and an unpadded 2x2 stride-1 conv over it
    (PlanOptions.phase_s2_max_density), flat-tiled where the split takes the conv's row stride (28 -> 14: the
    split's 15-wide rows would get a wider stride than the output's). Even and odd map sizes (odd ones read past
    the padded plane: the bounds-tested split), a residual block with a projection shortcut after it, batch 1
    and 3, one and two threads, NaN/Inf: as in PyTorch, and as with the strided conv."""
    import sparseforge as sf
    from sparseforge.engine.ir import PhaseOp
    from sparseforge.engine.testing import random_bn_statistics
    from sparseforge.sparsity.mask import fold_masks

    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(3, 48, 3, 1, 1), nn.BatchNorm2d(48), nn.ReLU(),
                      nn.Conv2d(48, 40, 3, 2, 1), nn.BatchNorm2d(40), nn.ReLU(),
                      BasicBlock(40, 56, 2, "relu", project=True))
    m = random_bn_statistics(m.eval(), torch.Generator().manual_seed(7))
    sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=3.6, connectivity_scope="layer"))
    m = fold_masks(m)
    x = torch.randn(3, 3, *hw)
    x[1, 0, 13, 9], x[2, 2, 3, 11] = float("nan"), float("inf")
    with torch.inference_mode():
        ref = m(x)
    # the 2x2 convs planned flat run the original kernels over each channel's 4 phase planes (phase_merge), their
    # spans aligned for the busiest kernel column (flat_align_column); each off, and both
    variants = [(1, PlanOptions()), (2, PlanOptions()), (2, PlanOptions(phase_merge=False)),
                (2, PlanOptions(flat_align_column=False)), (2, PlanOptions(phase_merge=False, flat_align_column=False))]
    for threads, opts in variants:
        e, st = compile(m, x[:1], threads=threads, return_stages=True, plan_options=opts)
        phases = [op for op in st.graph.ops if isinstance(op, PhaseOp)]
        assert phases and phases[0].inputs == [st.graph.ops[0].output]   # the first s2 conv's input: 48 x hw
        lowered = [c for c in st.plan.convs.values() if c.op.tap_period == 4]
        if hw == (28, 28):
            assert any(c.mode == "flat-tiled" for c in lowered)
        merged = [c for c in lowered if c.chan_planes == 4]
        assert all(c.flat and len(c.shapes) <= opts.max_shapes for c in merged)
        assert bool(merged) == (opts.phase_merge and any(c.flat for c in lowered)), e.summary(profile=False)
        with torch.inference_mode():
            for n in (1, 3):
                ok, why = compare_outputs(e(x[:n]), ref[:n], sparse=True)
                assert ok, (opts, why)
    e0, st0 = compile(m, x[:1], threads=2, return_stages=True, plan_options=PlanOptions(phase_s2_max_density=0))
    assert not any(isinstance(op, PhaseOp) for op in st0.graph.ops)
    with torch.inference_mode():
        ok, why = compare_outputs(e0(x), ref, sparse=True)
        assert ok, why


def test_random_stride2_sparse_networks_with_merged_phase_kernels_match_pytorch():
    """Generated networks around a sparse stride-2 conv on a map large enough for a phase split
    (testing.random_phase_network: 3x3 alone or in a basic block, 5x5; pattern libraries with filter groups, or
    the network fuzz's sparsities), batch 1-3, 1-3 threads, native and AVX2 builds, NaN/Inf in every other input:
    as in PyTorch, and some of the lowered convs run the original kernels over the phase planes
    (PlanOptions.phase_merge)."""
    from sparseforge.engine.build import AVX2_NEEDS
    from sparseforge.engine.testing import random_phase_network
    from sparseforge.hardware import all_cpu_flags

    isas = ["native"] + (["avx2"] if set(AVX2_NEEDS) <= set(all_cpu_flags()) else [])
    merged = 0
    for seed in range(10, 22):      # (12 and 21: 5x5 ones merged on AVX2, which must not run 2-D row tiles)
        m, x, desc = random_phase_network(seed)
        if seed % 2:
            x = with_nonfinite(x, seed)
        with torch.inference_mode():
            ref = m(x)
        for isa in isas:
            e, st = compile(m, x[:1], threads=1 + seed % 3, isa=isa, return_stages=True)
            merged += sum(c.chan_planes > 1 for c in st.plan.convs.values())
            with torch.inference_mode():
                ok, why = compare_outputs(e(x), ref, sparse=True)
            assert ok, (seed, isa, desc, why)
    assert merged >= 4, merged


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_dense_rgb_stems_on_avx2_run_as_a_phase_split(isa):
    """On 16-register builds a dense 3x3 stride-2 conv with at most PlanOptions.phase_s2_stem_cin_narrow input
    channels (MobileNetV2's RGB stem) on an input of at least PlanOptions.flat_tiled_min_bytes becomes a phase
    split and a 2x2 stride-1 conv, so no input vector is assembled from two loads and a shuffle: 1, 3 and 4
    channels, even and odd sizes, ReLU6, batch 1 and 3,
    NaN/Inf: as in PyTorch, and as the strided conv with the knob off; 5 channels stay strided."""
    from sparseforge.engine.ir import PhaseOp
    from sparseforge.engine.testing import random_bn_statistics

    if isa == "avx2":
        _skip_without_avx2()
    for cin, hw, split in ((3, (112, 113), True), (1, (190, 181), True), (4, (97, 90), True), (5, (112, 112), False)):
        torch.manual_seed(cin)
        m = nn.Sequential(nn.Conv2d(cin, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU6(),
                          nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
        m = random_bn_statistics(m.eval(), torch.Generator().manual_seed(cin))
        x = with_nonfinite(torch.randn(3, cin, *hw), seed=cin)
        with torch.inference_mode():
            ref = m(x)
        for knob in (4, 0):
            e, st = compile(m, x[:1], threads=2, isa=isa, return_stages=True,
                            plan_options=PlanOptions(phase_s2_stem_cin_narrow=knob))
            phased = any(isinstance(op, PhaseOp) for op in st.graph.ops)
            assert st.plan.narrow and phased == (split and knob > 0), (cin, knob, e.summary(profile=False))
            with torch.inference_mode():
                for n in (1, 3):
                    ok, why = compare_outputs(e(x[:n]), ref[:n], sparse=False)
                    assert ok, (cin, hw, knob, why)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("mr,nr,mr8,nr8", [(6, 4, 6, 2), (5, 3, 4, 3)])
def test_dense_1x1_gemm_mode_matches_pytorch(mr, nr, mr8, nr8, isa):
    """Dense stride-1 1x1 convs run as a GEMM along the flattened plane (ConvPlan.flat_gemm; 16-lane vectors and
    gemm_mr x gemm_nr blocks on 32-register hosts, 8-lane ones and gemm_mr_narrow x gemm_nr_narrow on AVX2 and
    portable builds): filter blocks padded with zero filters (cout not a multiple of the block), identity
    residuals, ReLU6, a map with one tile (items split by filter block across threads), the shifted last tile,
    batch 1 and 3, NaN/Inf: as in PyTorch."""
    from sparseforge.engine.testing import random_bn_statistics

    if isa == "avx2":
        _skip_without_avx2()

    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1), nn.BatchNorm2d(24), nn.ReLU6(),
                      nn.Conv2d(24, 37, 1), nn.BatchNorm2d(37), nn.ReLU6(),
                      Bottleneck(37, 20, 37, 1, "relu", 1), nn.MaxPool2d(2),
                      nn.Conv2d(37, 29, 1), nn.BatchNorm2d(29), nn.ReLU(),
                      nn.MaxPool2d((15, 1)), nn.Conv2d(29, 23, 1), nn.ReLU())     # 1x14: one tile
    m = random_bn_statistics(m.eval(), torch.Generator().manual_seed(7))
    x = torch.randn(3, 3, 30, 29)
    x[1, 0, 13, 9], x[2, 2, 3, 11] = float("nan"), float("inf")
    opts = PlanOptions(flat_gemm_min_pixels=0, gemm_mr=mr, gemm_nr=nr, gemm_mr_narrow=mr8, gemm_nr_narrow=nr8)
    e, st = compile(m, x[:1], threads=2, return_stages=True, plan_options=opts, isa=isa)
    gemm = [c for c in st.plan.convs.values() if c.mode == "flat-gemm"]
    wide = e.spec["options"]["wide"]
    mr_, nr_ = (mr, nr) if wide else (mr8, nr8)
    assert len(gemm) >= 4 and any(c.op.residual is not None for c in gemm), e.summary(profile=False)
    assert all(c.vec == (16 if wide else 8) and c.gemm_mr == mr_ for c in gemm)
    assert any(c.op.weight.shape[0] % mr_ for c in gemm) and any(c.flat_nv <= nr_ for c in gemm)
    with torch.inference_mode():
        for xb in (x[:1], x):
            out, ref = e(xb), m(xb)
            ok, why = compare_outputs(out, ref, sparse=False)
            assert ok, why
    assert (~e(x).isfinite()).any()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("act,dense", [("relu6", False), ("relu", False), ("relu6", True)])
def test_expand_and_depthwise_fuse_in_bands(stride, act, dense):
    """A 1x1 expand and the depthwise conv that alone reads it run as one op in bands of rows (``BandPlan``):
    odd, non-square maps (bands that end early, strips that meet the image's top and bottom), stride 1 and 2,
    NaN/Inf inputs, images left over after whole rounds, claimed parts, fewer threads at run time (the same
    bits), several band heights and channel chunks; sparse expand convs (kernel lists) and dense ones (F channels
    a step; 40 and 36 channels leave a partial last step)."""
    torch.manual_seed(3)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 12, 3, 1, 1), nn.ReLU(),
                                   InvertedResidual(12, 40, 12, stride, act, None),
                                   InvertedResidual(12, 36, 16, 1, act, None), nn.Conv2d(16, 8, 1)))
    if not dense:
        _prune_kernels(m, 3)
    d = dict(band_dense_min_bytes=0) if dense else {}
    x = torch.randn(4, 3, 29, 23)
    x[1, 0, 5, 7] = float("nan")
    x[2, 1, 20, 3] = float("inf")
    with torch.inference_mode():
        ref = m(x)
    outs = []
    for opts in (PlanOptions(**d), PlanOptions(band_rows=3, **d), PlanOptions(band_rows=1, band_f=4, **d),
                 PlanOptions(claim_parts=True, **d)):
        e = compile(m, x[:1], threads=2, plan_options=opts)
        fused = [op for op in e.spec["ops"] if "fused bands" in op["describe"]]
        assert len(fused) == 2, [op["describe"] for op in e.spec["ops"]]
        with torch.inference_mode():
            for n in (1, 3, 4):
                ok, why = compare_outputs(e(x[:n]), ref[:n], sparse=True)
                assert ok, (opts, n, why)
            y = e(x)
            e.run_threads = 1
            torch.testing.assert_close(e(x), y, rtol=0, atol=0, equal_nan=True)     # the same bits
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[3], rtol=0, atol=0, equal_nan=True)  # claimed parts: same items
    off = compile(m, x[:1], threads=2, plan_options=PlanOptions(fuse_bands=False, **d))
    assert not any("fused bands" in op["describe"] for op in off.spec["ops"])


class _FlattenForms(nn.Module):
    """A conv, then the map flattened for a linear layer the way user code writes it."""

    def __init__(self, form: str):
        super().__init__()
        self.conv, self.form = nn.Conv2d(3, 6, 3, 1, 1), form
        self.fc = nn.Linear(6 * 5 * 7 if form != "gap_view" else 6, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        f = self.form
        y = (y.view(y.size(0), -1) if f == "view_size" else y.view(y.size()[0], -1) if f == "view_size_index"
             else y.reshape(y.shape[0], -1) if f == "reshape_shape" else y.view(-1, 6 * 5 * 7) if f == "view_minus1"
             else torch.reshape(y, (y.shape[0], 6 * 5 * 7)) if f == "torch_reshape"
             else F.adaptive_avg_pool2d(y, 1).view(y.size(0), -1) if f == "gap_view" else y.view(1, -1))
        return self.fc(y)


@pytest.mark.parametrize("form", ["view_size", "view_size_index", "reshape_shape", "view_minus1", "torch_reshape",
                                  "gap_view", "view_one"])
def test_flattening_views_run_natively_for_every_batch(form):
    """``x.view(x.size(0), -1)`` and its kin flatten each image, whatever the batch: a native flatten (compiled at
    batch 1, run at 3). ``x.view(1, -1)`` flattens only a batch of 1, so it stays PyTorch's view."""
    torch.manual_seed(0)
    m = _FlattenForms(form).eval()
    e = compile(m, torch.randn(1, 3, 5, 7), threads=2)
    kinds = [op["describe"] for op in e.spec["ops"]]
    if form == "view_one":
        assert any(d.startswith("torch view") for d in kinds), kinds
        x = torch.randn(1, 3, 5, 7)
    else:
        assert all(op["native"] for op in e.spec["ops"]), e.summary(profile=False)
        x = with_nonfinite(torch.randn(3, 3, 5, 7), seed=2)
    with torch.inference_mode():
        ok, why = compare_outputs(e(x), m(x), sparse=False)
    assert ok, why


class _ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 unit at stride 1: ``chunk``, a branch, ``cat``, then channel_shuffle, which reads
    ``x.size()`` and reshapes with it."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch2 = nn.Sequential(nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
                                     nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                     nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch2(x2)), dim=1)
        b, c, h, w = out.size()
        out = out.view(b, 2, c // 2, h, w)
        return torch.transpose(out, 1, 2).contiguous().view(b, -1, h, w)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = LayerNorm2d(c)     # torchvision ConvNeXt's: its own parameters read in forward
        self.pw = nn.Conv2d(c, c, 1)
        self.layer_scale = nn.Parameter(torch.linspace(0.2, 1.0, c).view(c, 1, 1))

    def forward(self, x):
        return x + self.layer_scale * self.pw(F.gelu(self.norm(self.dw(x))))


@pytest.mark.parametrize("net", ["shufflenet", "convnext"])
def test_sizes_tuples_and_parameters_read_in_forward_fall_back_correctly(net):
    """Sizes (``x.size()``, ``c // 2``), tuples (``chunk``) and parameters read in forward (``self.weight``, a
    layer scale) used to stop the compiler ("does not produce a tensor", "direct parameter access"). They are now
    expressions the fallback ops evaluate on each call's tensors: the same outputs at another batch, NaN and Inf
    as PyTorch's, the convs around them native and every fallback named in summary(). ShuffleNet's chunk and
    channel shuffle are channel gathers, native (test_channel_gathers_run_natively)."""
    torch.manual_seed(1)
    c = 8
    body = (nn.Sequential(_ShuffleUnit(c), _ShuffleUnit(c)) if net == "shufflenet"
            else nn.Sequential(_ConvNeXtBlock(c), _ConvNeXtBlock(c)))
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), body, nn.Conv2d(c, 5, 3, 1, 1)).eval())
    e = compile(m, torch.randn(1, 3, 9, 11), threads=2)
    ops = e.spec["ops"]
    assert sum(op["native"] and op["kind"] == "conv" for op in ops) >= (6 if net == "shufflenet" else 4)
    fallbacks = [op for op in ops if not op["native"]]
    if net == "shufflenet":     # chunk and the shuffle are channel gathers now: nothing falls back. The second
        # unit's chunks read the first unit's concatenation through its shuffle, which no one else reads: 5 gathers
        assert not fallbacks and sum(op["kind"] == "gather" for op in ops) == 5, e.summary(profile=False)
    else:                       # the LayerNorm does
        assert fallbacks and all(op["name"] in e.summary(profile=False) for op in fallbacks)
    for b in (1, 3):
        x = with_nonfinite(torch.randn(b, 3, 9, 11), seed=b) if b > 1 else torch.randn(b, 3, 9, 11)
        with torch.inference_mode():
            ok, why = compare_outputs(e(x), m(x), sparse=False)
        assert ok, (b, why)


class _Arith(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, 1, 1), nn.Conv2d(6, 4, 3, 1, 1)

    def forward(self, x):
        y = self.a(x)
        y = (y * 2.0 + 1) / 4
        y = (0.5 - y) * 3
        y += 1.5
        y = 2 * torch.relu(y) - 0.25
        return self.b(y / -3.0)


def test_arithmetic_with_numbers_runs_natively():
    """Tensor-with-number arithmetic (``x * a + b``, ``a - x``, ``x / a``, ``x += a``) is a native per-channel
    affine, with NaN and Inf as PyTorch gives them."""
    torch.manual_seed(2)
    m = _Arith().eval()
    x = with_nonfinite(torch.randn(2, 3, 6, 7), seed=3)
    e = compile(m, x[:1], threads=2)
    assert all(op["native"] for op in e.spec["ops"]), e.summary(profile=False)
    assert sum(op["describe"] == "affine" for op in e.spec["ops"]) >= 6
    with torch.inference_mode():
        ok, why = compare_outputs(e(x), m(x), sparse=False)
    assert ok, why
    # 1 / 1e-35 is not a float32: dividing by it stays PyTorch's division
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), _Lambda(lambda t: t / 1e-35), nn.Conv2d(4, 2, 1)).eval()
    e = compile(tiny, x[:1], threads=2)
    assert [op["native"] for op in e.spec["ops"]] == [True, False, True]
    with torch.inference_mode():
        ok, why = compare_outputs(e(x), tiny(x), sparse=False)
    assert ok, why


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_functional_and_ceil_mode_pools_run_natively(isa):
    """``F.max_pool2d`` / ``F.avg_pool2d`` run as the pool modules do, and pools with ``ceil_mode`` natively: the
    windows past the map's end are clipped like padding (SqueezeNet's and GoogLeNet's pools); an average's divisor
    there counts the padding but not the overhang, as PyTorch's does."""
    if isa == "avx2":
        _skip_without_avx2()
    torch.manual_seed(4)
    cases = [(k, s, p, ceil, fn) for k, s, p in ((2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 1, 1), (5, 3, 2), (3, 3, 0))
             for ceil in (False, True) for fn in (False, True)]
    for hw in ((7, 8), (13, 13), (30, 33)):
        for k, s, p, ceil, fn in cases:
            for mode in ("max",) + (("avg", "avg_excl") if ceil and not fn else ()):
                if mode == "max":
                    pool = ((lambda t, k=k, s=s, p=p, c=ceil: F.max_pool2d(t, k, s, p, ceil_mode=c)) if fn
                            else nn.MaxPool2d(k, s, p, ceil_mode=ceil))
                else:
                    inc = mode == "avg"
                    pool = ((lambda t, k=k, s=s, p=p, c=ceil, i=inc: F.avg_pool2d(t, k, s, p, ceil_mode=c,
                                                                                   count_include_pad=i)) if fn
                            else nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=inc))
                m = nn.Sequential(nn.Conv2d(3, 5, 3, 1, 1), _Lambda(pool), nn.Conv2d(5, 4, 3, 1, 1)).eval()
                x = with_nonfinite(torch.randn(2, 3, *hw), seed=k + s)
                e = compile(m, x[:1], threads=2, isa=isa)
                assert all(op["native"] for op in e.spec["ops"]), (k, s, p, ceil, fn, mode, e.summary(profile=False))
                with torch.inference_mode():
                    ok, why = compare_outputs(e(x), m(x), sparse=False)
                assert ok, (hw, k, s, p, ceil, fn, mode, why)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_a_model_returning_a_size_is_refused_in_one_line():
    class SizeOut(nn.Module):
        def forward(self, x):
            return x.size(1)

    with pytest.raises(SparseforgeError, match="not a batched tensor"):
        compile(SizeOut().eval(), torch.randn(1, 3, 4, 4), threads=1)


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_grouped_convs_run_natively(isa):
    """Grouped convs of every kind -- ResNeXt's 3x3, ShuffleNet's 1x1, 5x5 and 7x7 (stride 2: a phase split and a
    grouped conv over each group's phases), padding under half the kernel, one group per input channel with
    several filters each -- run in the generated kernels: each filter reads only its own group's channels, so a
    NaN in one group stays out of the others, as in PyTorch."""
    if isa == "avx2":
        _skip_without_avx2()
    torch.manual_seed(6)
    cases = [(8, 8, 2, 3, 1, 1), (12, 18, 3, 3, 2, 1), (64, 64, 32, 3, 1, 1), (24, 12, 4, 1, 1, 0),
             (24, 48, 4, 1, 2, 0), (16, 32, 16, 3, 1, 1), (20, 40, 20, 5, 2, 2), (12, 12, 3, 5, 1, 2),
             (12, 24, 6, 7, 2, 3), (18, 18, 3, 3, 1, 0), (20, 20, 4, 5, 1, 1), (64, 128, 32, 3, 2, 1)]
    for hw in ((9, 11), (33, 30)):
        for cin, cout, g, k, s, p in cases:
            m = randomize_bn(nn.Sequential(nn.Conv2d(3, cin, 3, 1, 1), nn.BatchNorm2d(cin), nn.ReLU(),
                                           nn.Conv2d(cin, cout, k, s, p, groups=g), nn.BatchNorm2d(cout), nn.ReLU(),
                                           nn.Conv2d(cout, 5, 1)).eval())
            x = with_nonfinite(torch.randn(3, 3, *hw), seed=k + s + g)
            e = compile(m, x[:1], threads=2, isa=isa)
            assert all(op["native"] for op in e.spec["ops"]), (cin, cout, g, k, s, p, e.summary(profile=False))
            with torch.inference_mode():
                ok, why = compare_outputs(e(x), m(x), sparse=False)
            assert ok, (hw, cin, cout, g, k, s, p, why)


# (kernel, dilation, padding, stride, groups: 0 = depthwise) of the dilated and non-square convs the engine runs
# embedded in a square kernel: DeepLab's atrous 3x3s, Inception's 1x7/7x1 and 1x3/3x1, mixed dilation, a
# padding under the dilated kernel's half (smaller output), an even dilated kernel, stride 2 (phase split)
_EMBEDDED = [((3, 3), (2, 2), (2, 2), 1, 1), ((3, 3), (3, 3), (3, 3), 1, 1), ((3, 3), (2, 2), (2, 2), 2, 1),
             ((3, 3), (2, 2), (2, 2), 1, 0), ((3, 3), (2, 2), (2, 2), 2, 0), ((1, 7), (1, 1), (0, 3), 1, 1),
             ((7, 1), (1, 1), (3, 0), 1, 1), ((1, 3), (1, 1), (0, 1), 1, 1), ((3, 1), (1, 1), (1, 0), 2, 1),
             ((1, 5), (1, 1), (0, 2), 1, 0), ((3, 3), (2, 2), (1, 1), 1, 1), ((3, 3), (2, 1), (2, 1), 1, 1),
             ((2, 2), (2, 2), (1, 1), 1, 1), ((3, 3), (2, 2), (2, 2), 1, 4), ((1, 7), (1, 1), (0, 3), 2, 1)]


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_dilated_and_non_square_convs_run_natively(isa):
    """Dilated and non-square convs run in the generated kernels, embedded in a square kernel whose other taps are
    structural zeros. PyTorch never reads the pixels under those taps, so no mode may multiply them: a NaN there
    must not reach the output (strict NaN placement, the conv first so the NaN sits under the zeros). Dense
    weights, forced native (embed_max_kernels 1, embed_grouped), in every kernel mode the planner may pick (auto, and direct and
    blocked forced); then the defaults: one that keeps a quarter of its kernels native unless grouped, one that
    keeps them all in oneDNN, saying so."""
    if isa == "avx2":
        _skip_without_avx2()
    torch.manual_seed(7)
    every = PlanOptions(embed_max_kernels=1.0, embed_grouped=True)
    for hw, modes in (((9, 13), ("auto", "direct", "blocked")), ((30, 28), ("auto",))):
        for (k, d, p, s, g) in _EMBEDDED:
            cin, cout = 16, (16 if g == 0 else 24)
            m = randomize_bn(nn.Sequential(nn.Conv2d(cin, cout, k, s, p, d, g or cin), nn.BatchNorm2d(cout),
                                           nn.ReLU(), nn.Conv2d(cout, 5, 1)).eval())
            x = with_nonfinite(torch.randn(3, cin, *hw), seed=sum(k) + s)
            for mode in modes:
                e = compile(m, x[:1], threads=2, isa=isa, conv_mode=mode, plan_options=every)
                assert all(op["native"] for op in e.spec["ops"]), (k, d, p, s, g, e.summary(profile=False))
                with torch.inference_mode():
                    ok, why = compare_outputs(e(x), m(x), sparse=False)
                assert ok, (hw, k, d, p, s, g, mode, why)
            e = compile(m, x[:1], threads=2, isa=isa)
            assert [op["native"] for op in e.spec["ops"]][:1] == [False], (k, d, p, s, g)
            assert "dilated or non-square conv, grouped or keeping most kernels: oneDNN" in e.summary(profile=False)
            with torch.no_grad():           # 1 in 4 kernels kept (connectivity pruning)
                kern = m[0].weight.flatten(2)
                kern[torch.rand(kern.shape[:2]) >= 0.25] = 0
                kern.view(-1, kern.shape[2])[torch.randperm(kern.shape[0] * kern.shape[1])[:1]] = 1.0
            e = compile(m, x[:1], threads=2, isa=isa)
            assert all(op["native"] for op in e.spec["ops"]) == (g == 1), (k, d, p, s, g, e.summary(profile=False))
            with torch.inference_mode():
                ok, why = compare_outputs(e(x), m(x), sparse=True)
            assert ok, (hw, k, d, p, s, g, "sparse", why)


def test_conv_embedding_is_exact_or_refused():
    """embed_conv places the kernel where it reads the pixels the original reads, records its taps, and refuses
    what no square kernel of a native size reproduces for every input size."""
    from sparseforge.engine.trace import embed_conv
    w = torch.randn(4, 3, 1, 7)
    wk, pad, e = embed_conv((1, 7), (1, 1), (0, 3), w)
    assert wk.shape == (4, 3, 7, 7) and pad == 3 and torch.equal(e.original(wk), w)
    assert e.taps(7) == tuple(range(21, 28)) and int((wk != 0).sum()) == int((w != 0).sum())
    wk, pad, e = embed_conv((3, 3), (3, 3), (3, 3), torch.randn(2, 2, 3, 3))
    assert wk.shape[2:] == (7, 7) and pad == 3 and e.taps(7) == (0, 3, 6, 21, 24, 27, 42, 45, 48)
    assert embed_conv((1, 3), (1, 1), (0, 0), w[..., :3]) is None          # 1-row taller output than wide
    assert embed_conv((3, 3), (4, 4), (4, 4), torch.randn(1, 1, 3, 3)) is None   # a 9x9 reach
    x = torch.randn(1, 3, 11, 10)
    for (k, d, p) in [((1, 7), (1, 1), (0, 3)), ((3, 3), (2, 2), (1, 1)), ((3, 1), (2, 1), (2, 0))]:
        w = torch.randn(4, 3, *k)
        wk, pad, _ = embed_conv(k, d, p, w)
        for s in (1, 2):
            assert torch.allclose(F.conv2d(x, wk, None, s, pad), F.conv2d(x, w, None, s, p, d), atol=1e-5), (k, d, s)


class _ConstArith(nn.Module):
    """A map and a constant tensor of one value per channel (a parameter or buffer read in forward: ConvNeXt's
    and CaiT's layer scale, a normalisation written out), after a conv (folded into it) or after an activation."""

    def __init__(self, c, kind):
        super().__init__()
        self.kind = kind
        self.conv, self.conv2 = nn.Conv2d(c, c, 3, 1, 1), nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.linspace(-1.5, 1.5, c).view(c, 1, 1))
        self.g4 = nn.Parameter(torch.linspace(0.5, 2.5, c).view(1, c, 1, 1))
        self.s = nn.Parameter(torch.tensor(0.7))
        self.register_buffer("mu", torch.randn(1, c, 1, 1))

    def forward(self, x):
        y, k = self.conv(x), self.kind
        if k == "after_act":
            y = torch.relu(y)
        if k in ("mul", "after_act"):
            y = y * self.gamma
        elif k == "mul_left":
            y = self.g4 * y
        elif k == "sub_div":
            y = (y - self.mu) / self.g4
        elif k == "rsub":
            y = self.mu - y
        elif k == "one_number":
            y = y * self.s
        elif k == "in_place":
            y = y.mul_(self.gamma)
        elif k == "residual":
            y = x + self.gamma * y
        return self.conv2(torch.relu(y))


def test_per_channel_constants_run_natively():
    """A map times, plus, minus or divided by a constant with one value per channel runs natively: folded into the
    conv before it as a BatchNorm is, else as a per-channel affine. A constant of another shape would broadcast
    along other axes and stays a fallback."""
    kinds = ["mul", "mul_left", "sub_div", "rsub", "one_number", "in_place", "residual", "after_act"]
    for i, kind in enumerate(kinds):
        m = _ConstArith(12, kind).eval()
        x = with_nonfinite(torch.randn(2, 12, 9, 11), seed=i)
        e = compile(m, x[:1], threads=2)
        assert all(op["native"] for op in e.spec["ops"]), (kind, e.summary(profile=False))
        folded = "scale" in e.spec["ops"][0]["describe"]
        assert folded == (kind != "after_act"), (kind, e.spec["ops"][0]["describe"])
        with torch.inference_mode():
            ok, why = compare_outputs(e(x), m(x), sparse=False)
        assert ok, (kind, why)

    class AlongWidth(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 1, 1)
            self.w = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return self.conv(x) * self.w

    m = AlongWidth().eval()
    x = torch.randn(2, 3, 5, 6)
    e = compile(m, x[:1], threads=1)
    assert [op["native"] for op in e.spec["ops"]] == [True, False]
    with torch.inference_mode():
        ok, why = compare_outputs(e(x), m(x), sparse=False)
    assert ok, why


class _Gather(nn.Module):
    """A conv, then code that moves whole channels (or, for the ``not_*`` kinds, does not), then a conv."""

    def __init__(self, kind: str, c: int = 12):
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, c, 3, 1, 1)
        cout = {"chunk3": c // 3, "split": 5, "slice": 4, "step": c // 2, "narrow": 3, "repeat": 4,
                "two_halves": c // 2}.get(kind, c)
        self.b = nn.Conv2d(cout, 5, 3, 1, 1)

    def forward(self, x):
        y, k = self.a(x), self.kind
        n, c, h, w = y.size()
        if k == "chunk_swap":
            y1, y2 = y.chunk(2, dim=1)
            z = torch.cat((y2, y1), 1)
        elif k == "chunk_of_sum":          # a map made by an add (an add on sizes is data movement, this is not)
            y1, y2 = (y + y * 2.0).chunk(2, dim=1)
            z = torch.cat((y2, y1), 1)
        elif k == "chunk3":
            z = torch.chunk(y, 3, 1)[1]
        elif k == "split":
            z = torch.split(y, [7, 5], dim=1)[1]
        elif k == "slice":
            z = y[:, 2:6]
        elif k == "step":
            z = y[:, 1::2]
        elif k == "narrow":
            z = y.narrow(1, 4, 3)
        elif k == "repeat":
            z = y[:, [3, 3, 0, 11]]
        elif k == "shuffle_permute":        # a shuffle written with reshape, permute and flatten
            z = y.reshape(n, 3, c // 3, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
        elif k.startswith("shuffle"):       # torchvision's, with 2, 3 and 4 groups
            g = int(k[-1])
            z = torch.transpose(y.view(n, g, c // g, h, w), 1, 2).contiguous().view(n, -1, h, w)
        elif k == "flip":
            z = y.flip(1)
        elif k == "roll":
            z = torch.roll(y, 5, 1)
        elif k == "identity_views":        # every channel in order: no copy at all
            z = y.contiguous().view(n, c, h, w)
        elif k == "two_halves":            # one gather read twice, another at the graph's output
            y1, y2 = y.chunk(2, dim=1)
            return self.b(y1) + self.b(y1), y2
        elif k == "not_spatial":           # a transpose of the map (square): not one plane per plane
            z = y.transpose(2, 3)
        elif k == "not_scrambled":         # a view that mixes rows and channels into the same shape
            z = y.view(n, h, c, w).transpose(1, 2).reshape(n, c, h, w)
        elif k == "not_batch":             # images swapped: not within an image
            z = y.flip(0)
        return self.b(z)


GATHERS = ["chunk_swap", "chunk_of_sum", "chunk3", "split", "slice", "step", "narrow", "repeat", "shuffle2", "shuffle3", "shuffle4",
           "shuffle_permute", "flip", "roll", "identity_views", "two_halves"]


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_channel_gathers_run_natively(isa):
    """Code that picks, reorders or repeats whole channels -- ``chunk``, ``split``, slices, ``narrow``, ShuffleNet's
    channel shuffle written two ways, ``flip``/``roll`` over channels -- runs as native plane copies
    (trace.channel_gathers proves each on position probes), at the traced batch and another one with NaN and Inf.
    Moves that are not whole planes of one image (a spatial transpose, rows mixed into channels, images swapped)
    stay fallbacks and stay correct. With ``channel_gathers`` off every kind falls back again."""
    if isa == "avx2":
        _skip_without_avx2()
    for i, kind in enumerate(GATHERS + ["not_spatial", "not_scrambled", "not_batch"]):
        torch.manual_seed(i)
        m = _Gather(kind).eval()
        hw = (9, 9) if kind.startswith("not") else (7, 10)
        e = compile(m, torch.randn(1, 3, *hw), threads=2, isa=isa)
        ops = e.spec["ops"]
        gathers = [op for op in ops if op["kind"] == "gather"]
        if kind.startswith("not"):
            assert not gathers and any(not op["native"] for op in ops), (kind, e.summary(profile=False))
        else:
            assert all(op["native"] for op in ops), (kind, e.summary(profile=False))
            want = {"identity_views": 0, "chunk_swap": 2, "chunk_of_sum": 2, "two_halves": 2}.get(kind, 1)
            assert len(gathers) == want, (kind, e.summary(profile=False))
        for b in (1, 3):
            x = with_nonfinite(torch.randn(b, 3, *hw), seed=b) if b > 1 else torch.randn(b, 3, *hw)
            with torch.inference_mode():
                got, want = e(x), m(x)
            for g_, w_ in zip(*((got, want) if isinstance(want, tuple) else ((got,), (want,)))):
                ok, why = compare_outputs(g_, w_, sparse=False)
                assert ok, (kind, b, why)
    e = compile(_Gather("shuffle2").eval(), torch.randn(1, 3, 7, 10), threads=2,
                plan_options=PlanOptions(channel_gathers=False))
    assert not any(op["kind"] == "gather" for op in e.spec["ops"])
    assert any(not op["native"] for op in e.spec["ops"])


def test_channel_gathers_are_proved_on_probes():
    """``channel_gathers`` maps the final node of each whole-channel move to its source and index, for the code as
    written (groups, split sizes, slices with steps), and maps nothing where a move is not whole planes."""
    from sparseforge.engine.trace import channel_gathers, trace

    found = {}
    for kind in GATHERS + ["not_spatial", "not_scrambled", "not_batch"]:
        m = _Gather(kind).eval()
        gm = trace(m, torch.randn(1, 3, 9, 9))
        found[kind] = sorted(ix for _, ix in channel_gathers(gm).values())
    c = 12
    assert found["shuffle2"] == [tuple(b * 6 + a for a in range(6) for b in range(2))]
    assert found["shuffle3"] == [tuple(b * 4 + a for a in range(4) for b in range(3))]
    assert found["shuffle_permute"] == found["shuffle3"]
    assert found["chunk_swap"] == found["chunk_of_sum"] == [tuple(range(6)), tuple(range(6, 12))]
    assert found["chunk3"] == [(4, 5, 6, 7)]
    assert found["split"] == [tuple(range(7, 12))]
    assert found["step"] == [tuple(range(1, c, 2))]
    assert found["repeat"] == [(3, 3, 0, 11)]
    assert found["flip"] == [tuple(range(c - 1, -1, -1))]
    assert found["roll"] == [tuple((j - 5) % c for j in range(c))]
    assert found["identity_views"] and all(ix == tuple(range(c)) for ix in found["identity_views"])
    assert found["not_spatial"] == found["not_scrambled"] == found["not_batch"] == []


class _Resize(nn.Module):
    """A conv, a resize as a user writes it, a conv over it (and the skip it is sized to, as U-Net's decoder)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 6, 3, 1, 1), nn.Conv2d(6, 4, 3, 1, 1)
        self.up = {"module_bilinear": nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                   "module_nearest": nn.Upsample(size=(11, 5)),
                   "module_upsampling_bilinear": nn.UpsamplingBilinear2d(scale_factor=1.5)}.get(kind, nn.Identity())

    def forward(self, x):
        y, k = self.a(x), self.kind
        if k.startswith("module"):
            return self.b(self.up(y))
        if k == "skip_size":                # size read from another map in forward
            z = F.max_pool2d(y, 2)
            return self.b(y + F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False))
        if k == "bicubic":                  # no native kernel: a fallback, still exact
            return self.b(F.interpolate(y, scale_factor=2, mode="bicubic", align_corners=False))
        mode, ac, kw = {"nearest2": ("nearest", None, {"scale_factor": 2}),
                        "nearest_frac": ("nearest", None, {"scale_factor": 1.7}),
                        "nearest_down": ("nearest", None, {"size": (3, 4)}),
                        "bilinear_frac": ("bilinear", False, {"scale_factor": (2.5, 0.6)}),
                        "bilinear_recompute": ("bilinear", False, {"scale_factor": 1.3, "recompute_scale_factor": True}),
                        "bilinear_corners": ("bilinear", True, {"size": (12, 9)})}[k]
        return self.b(F.interpolate(y, mode=mode, align_corners=ac, **kw))


RESIZES = ["module_bilinear", "module_nearest", "module_upsampling_bilinear", "skip_size", "nearest2", "nearest_frac",
           "nearest_down", "bilinear_frac", "bilinear_recompute", "bilinear_corners"]


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_resizes_run_natively(isa):
    """Nearest and bilinear ``F.interpolate`` / ``nn.Upsample`` (U-Net, FPN and DeepLab decoders) run natively with
    PyTorch's index rules -- scale factors as given or recomputed, fractional and per-axis, align_corners, a size
    read from another map -- at the traced batch and another one with NaN and Inf (bilinear multiplies every one
    of its four pixels, as PyTorch does, so a NaN beside a pixel spreads alike). Bicubic stays a fallback; with
    ``native_resize`` off every resize does."""
    if isa == "avx2":
        _skip_without_avx2()
    for i, kind in enumerate(RESIZES + ["bicubic"]):
        torch.manual_seed(i)
        m = _Resize(kind).eval()
        e = compile(m, torch.randn(1, 3, 6, 7), threads=2, isa=isa)
        ops = e.spec["ops"]
        if kind == "bicubic":
            assert not any(op["kind"] == "resize" for op in ops) and any(not op["native"] for op in ops)
        else:
            assert all(op["native"] for op in ops) and sum(op["kind"] == "resize" for op in ops) == 1, \
                (kind, e.summary(profile=False))
        for b in (1, 3):
            x = with_nonfinite(torch.randn(b, 3, 6, 7), seed=b) if b > 1 else torch.randn(b, 3, 6, 7)
            with torch.inference_mode():
                ok, why = compare_outputs(e(x), m(x), sparse=False)
            assert ok, (kind, b, why)
    e = compile(_Resize("nearest2").eval(), torch.randn(1, 3, 6, 7), threads=2,
                plan_options=PlanOptions(native_resize=False))
    assert not any(op["kind"] == "resize" for op in e.spec["ops"])


def test_resize_tables_agree_with_pytorch():
    """``resize_tables`` reproduces PyTorch's pixel choice (nearest) and weights (bilinear, float32 as ATen's CPU
    kernel computes them) for sizes and scales drawn at random, so none of them falls back for disagreeing; and a
    table that PyTorch disagrees with is refused (checked by shifting one weight)."""
    import random

    from sparseforge.engine import trace as tr

    r = random.Random(0)
    for _ in range(150):
        h, w = r.randint(1, 40), r.randint(1, 40)
        mode, ac = r.choice([("nearest", False), ("bilinear", False), ("bilinear", True)])
        if r.random() < 0.5:
            scales = (r.choice([0.5, 1.5, 2.0, 2.5, 3.0, 1.3, 0.75]), r.choice([0.5, 2.0, 1.7, 4.0]))
            out = (int(h * scales[0]), int(w * scales[1]))
            if min(out) < 1:
                continue
        else:
            scales, out = None, (r.randint(1, 60), r.randint(1, 60))
        assert tr.resize_tables(mode, ac, scales, (h, w), out) is not None, (mode, ac, scales, h, w, out)
    orig = tr._linear_axis

    def off(*a):
        idx, wts = orig(*a)
        wts[1] += 0.01
        return idx, wts

    tr._linear_axis = off
    try:
        assert tr.resize_tables("bilinear", False, None, (5, 6), (9, 11)) is None
    finally:
        tr._linear_axis = orig


def test_gathers_and_resizes_are_saved_and_loaded(tmp_path):
    """An engine with channel gathers and resizes (all native) is saved as data and rebuilt from it: the tables
    and indices round-trip through the artefact's JSON, and the rebuilt engine gives the same bits."""
    from sparseforge.engine import load_engine

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 4, 3, 1, 1)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.size()
            y = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, -1, h, w)
            y1, y2 = y.chunk(2, dim=1)
            z = torch.cat((F.interpolate(y1, scale_factor=1.5, mode="bilinear", align_corners=False),
                           F.interpolate(y2, scale_factor=1.5, mode="nearest")), 1)
            return self.b(z)

    m = Decoder().eval()
    x = torch.randn(2, 3, 6, 9)
    e = compile(m, x[:1], threads=2)
    assert all(op["native"] for op in e.spec["ops"])
    assert sorted(op["kind"] for op in e.spec["ops"] if op["kind"] in ("gather", "resize")) == \
        ["gather", "gather", "resize", "resize"]
    e.save(tmp_path / "eng")
    e2 = load_engine(tmp_path / "eng")
    with torch.inference_mode():
        assert torch.equal(e2(x), e(x))
        ok, why = compare_outputs(e(x), m(x), sparse=False)
    assert ok, why


class _Aliased(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(4, 3, 3, 1, 1), nn.Conv2d(8, 3, 3, 1, 1)

    def forward(self, x):
        y, k = self.a(x), self.kind
        if k == "write_base_read_view":
            z = y[:, 2:6]
            y.mul_(2.0)
            return self.b(z)
        if k == "write_view_read_base":
            z = y[:, 2:6]
            z.mul_(2.0)
            return self.c(y)
        if k == "inplace_relu_of_base":
            z = y[:, 2:6]
            F.relu(y, inplace=True)
            return self.b(z) + self.c(y)
        if k == "augmented_into_view":      # traced as z = z + 1: the trace itself differs from the model
            z = y.chunk(2, 1)[1]
            z += 1.0
            return self.c(y)
        if k == "write_view_base_dead":     # nothing else reads the storage afterwards: exact
            z = y[:, 2:6]
            z.relu_()
            return self.b(z)
        if k == "view_after_write":         # the view is taken after the write: exact
            y.mul_(2.0)
            return self.b(y[:, 2:6]) + self.c(y)
        return self.c(F.relu(y, inplace=True))


def test_writes_through_views_are_refused_or_exact():
    """PyTorch sees an in-place write through every view of the storage; the compiler's values are copies. A write
    into a tensor that a view made before it shares and is read after it (either way round, ``mul_`` or an
    in-place ReLU) is refused in one line naming the op and the fix, and so is a trace that computes something
    else than the model (``z += 1`` into a view is traced as ``z = z + 1``). Writes nothing else sees compile and
    are exact. (Both wrong answers were silent before, with the views as PyTorch fallbacks too.)"""
    for kind in ("write_base_read_view", "write_view_read_base", "inplace_relu_of_base", "augmented_into_view"):
        with pytest.raises(SparseforgeError, match="out of place"):
            compile(_Aliased(kind).eval(), torch.randn(1, 3, 6, 7), threads=2)
    for kind in ("write_view_base_dead", "view_after_write", "plain_inplace"):
        m = _Aliased(kind).eval()
        x = with_nonfinite(torch.randn(3, 3, 6, 7), seed=4)
        e = compile(m, x[:1], threads=2)
        with torch.inference_mode():
            ok, why = compare_outputs(e(x), m(x), sparse=False)
        assert ok, (kind, why)
