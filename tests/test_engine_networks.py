"""Whole networks through the compiler vs PyTorch: the block combinations real CNNs are made of.

Regression tests for bugs that only showed when blocks meet (a projection shortcut traced after the branch it is
added to, a pooled vector read as a map by squeeze-excite's 1x1 convs, NaN turned into 0 by the generated ReLU),
then a fuzz over generated networks (engine.testing.random_network: stems, basic/bottleneck/inverted/SE/concat/
grouped/dilated blocks, pools, six activations, odd channel counts, non-square inputs, batch 1-8, dense and sparse).
bench/engine_fuzz.py --networks runs thousands.
"""

import pytest
import torch
import torch.nn as nn

from engine_util import randomize_bn, rel_err
from sparseforge.engine import compile
from sparseforge.engine.testing import (BasicBlock, Bottleneck, InvertedResidual, SqueezeExcite, compare_outputs,
                                        random_network, with_nonfinite)

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


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_squeeze_excite(gate):
    """The pooled (C,1,1) vector is read by 1x1 convs as a map: it must be laid out as one."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1), nn.ReLU(), SqueezeExcite(24, 6, gate)).eval()
    x = torch.randn(3, 3, 10, 14)
    e = compile(m, x[:1], threads=2)
    with torch.inference_mode():
        assert rel_err(e(x), m(x)) < 1e-5


NAN_NETS = {
    "conv-relu": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU6()),
    "conv-maxpool": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 1)),
    "narrow-map (flat mode)": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1)),
    "inverted block (fused)": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1),
                                                    InvertedResidual(8, 24, 8, 1, "relu6", None)),
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
                                           ("mobilenet_v2", "pattern8x"), ("vgg16_bn", "pattern8x")])
def test_imagenet_zoo_through_the_engine(name, sparsity):
    """The networks people ship, at 224x224 with non-trivial BN statistics: correct, and no PyTorch fallback
    except convs the generated kernels do not cover (ResNet's 7x7 stem runs in oneDNN with BN and ReLU folded)."""
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
    assert all(d.startswith("torch conv7x7") for d in fallbacks), fallbacks
