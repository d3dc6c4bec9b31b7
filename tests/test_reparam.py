"""Structural re-parameterization: every registered block folds exactly; RepGhostNet builds, folds and compiles."""

import pytest
import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.models.reparam import REPARAMETERIZABLE, count_foldable
from sparseforge.models.repghost import RepGhostModule
from sparseforge.structured import count_macs

# the smallest instance of each registered block, with an input: a newly registered block must be added here
EXAMPLES = {
    "repghostmodule": lambda: (RepGhostModule(6, 10), torch.randn(1, 6, 9, 11)),
    "repghostmodule-linear": lambda: (RepGhostModule(6, 10, relu=False, dw_size=5), torch.randn(1, 6, 9, 11)),
    "repvggblock": lambda: (sf.models.RepVGGBlock(8, 8), torch.randn(1, 8, 10, 7)),
    "repvggblock-stride2": lambda: (sf.models.RepVGGBlock(6, 12, stride=2), torch.randn(1, 6, 10, 7)),
    "repvggblock-grouped": lambda: (sf.models.RepVGGBlock(8, 8, groups=2), torch.randn(1, 8, 10, 7)),
}


def _random_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def test_every_registered_block_has_an_example():
    covered = {type(make()[0]).__name__.lower() for make in EXAMPLES.values()}
    assert covered == set(REPARAMETERIZABLE.names())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("batch", [1, 8])
def test_folding_is_exact_for_random_bn_statistics(name, batch):
    for seed in range(3):
        torch.manual_seed(seed)
        block, x = EXAMPLES[name]()
        block = _random_bn(block, seed)
        x = x.repeat(batch, 1, 1, 1) + 0.1 * torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            ref = block(x)
            folded = sf.reparameterize(block, inplace=False)
            out = folded(x)
        assert count_foldable(folded) == 0
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5, (name, seed)


@pytest.mark.parametrize("width,size", [(0.5, 32), (1.0, 224)])
def test_repghostnet_folds_in_place_and_keeps_outputs(width, size):
    m = _random_bn(sf.create_model("repghostnet", num_classes=10, width=width, input_size=size), 0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = m(x)
    n = count_foldable(m)
    assert n == 32                        # two ghost modules in each of the 16 bottlenecks
    params = sum(p.numel() for p in m.parameters())
    assert sf.reparameterize(m) is m and count_foldable(m) == 0
    with torch.no_grad():
        out = m(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert sum(p.numel() for p in m.parameters()) < params


def test_repghostnet_size_matches_the_paper_at_224():
    """RepGhostNet 1.0x: 142 M multiply-adds (the paper's "142 MFLOPs") and 4.1 M parameters after folding."""
    m = sf.reparameterize(sf.create_model("repghostnet", num_classes=1000, width=1.0, input_size=224).eval())
    macs = count_macs(m, torch.randn(1, 3, 224, 224))
    assert 138e6 <= macs <= 146e6, macs
    assert 4.0e6 <= sum(p.numel() for p in m.parameters()) <= 4.2e6
    names = {n for n, _ in sf.create_model("repghostnet", input_size=224).named_modules()}
    for official in ("conv_stem", "blocks.0.0.ghost1.primary_conv.0", "blocks.0.0.ghost1.cheap_operation.0",
                     "blocks.0.0.ghost1.fusion_bn.0", "blocks.3.0.se.conv_reduce", "blocks.3.0.conv_dw",
                     "blocks.3.0.shortcut.0", "conv_head", "classifier"):
        assert official in names, official


def test_folded_repghostnet_compiles_and_matches_pytorch():
    m = sf.reparameterize(_random_bn(sf.create_model("repghostnet", width=0.5), 1))
    x = torch.randn(2, 3, 32, 32)
    engine = sf.compile(m, x[:1], threads=1)
    with torch.no_grad():
        ref = m(x)
    assert float((engine(x) - ref).abs().max() / ref.abs().max()) <= 1e-4
    ops = engine.spec["ops"]
    assert any("hardsigmoid" in op["describe"] for op in ops)       # squeeze-excite's gate runs natively
    # only the 5x5 stride-2 depthwise convs fall back (padding 2 with stride 2 is not lowered for depthwise)
    assert all("conv5x5 s2" in op["describe"] for op in ops if not op["native"])


def test_a_new_block_registers_with_one_decorator():
    @sf.models.reparameterizable
    class ScaledConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.conv(x) * self.scale

        def fold(self):
            c = nn.Conv2d(3, 3, 3, padding=1)
            c.weight.copy_(self.conv.weight * self.scale)
            c.bias.copy_(self.conv.bias * self.scale)
            return c

    try:
        m = nn.Sequential(ScaledConv(), nn.ReLU())
        x = torch.randn(1, 3, 5, 5)
        ref = m(x)
        sf.reparameterize(m)
        assert type(m[0]) is nn.Conv2d and torch.allclose(m(x), ref, atol=1e-6)
    finally:
        REPARAMETERIZABLE.unregister("ScaledConv")


def test_recipe_folds_then_prunes_and_the_saved_model_rebuilds_folded(tiny_recipe, tmp_path):
    from sparseforge.models import load_weights, model_from_spec, read_state_dict, spec_from_metadata
    from sparseforge.recipe import RecipeRunner

    recipe = tiny_recipe({"method": "reparameterize", "runs": 5}, {"method": "pattern", "connectivity": "2x"},
                         model="repghostnet")
    runner = RecipeRunner(recipe, tmp_path / "run", log=lambda s: None, progress=False)
    res = runner.run()
    r = res["stages"][0]["reparameterize"]
    assert r["folded_blocks"] == 32 and r["after"]["params"] < r["before"]["params"]
    assert "## Re-parameterization (stage 0)" in (tmp_path / "run" / "report.md").read_text()
    assert count_foldable(runner.model) == 0
    # the folded depthwise kernels carry the pruning masks
    dw = runner.model.blocks[0][0].ghost1.cheap_operation
    assert hasattr(dw, "weight_mask") or isinstance(dw, nn.Conv2d)
    p = tmp_path / "run" / "model.safetensors"
    spec = spec_from_metadata(read_state_dict(p)[1], p)
    assert spec["reparameterized"]
    again = load_weights(model_from_spec(spec), p).eval()
    x = runner.state.example()
    with torch.no_grad():
        assert torch.allclose(again(x), runner.model.eval()(x), atol=1e-5)
