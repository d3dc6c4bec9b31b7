"""Contract tests for the sparsity methods (registry-driven where the contract is shared)."""

import copy

import pytest
import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.models import create_model, load_weights, save_weights
from sparseforge.sparsity import (METHOD_CONFIGS, ADMMCallback, ADMMConfig, Mask, MagnitudeConfig, PatternConfig,
                                  get_mask, library_strings, masked_modules)
from sparseforge.sparsity.patterns import all_candidates, pconv_library
from sparseforge.errors import ConfigError, SparseforgeError

CONFIGS = {      # mask methods: prune in place, weights masked to exact zeros
    "pattern": PatternConfig(num_patterns=8, connectivity=3.6),
    "magnitude": MagnitudeConfig(sparsity=0.8),
}
STRUCTURAL = {   # structural methods: return a new, physically smaller dense model
    "structured": sf.StructuredConfig(mac_ratio=0.5),
    "depth": sf.DepthConfig(mac_ratio=0.5, importance="bn"),
}
NO_BLOCKS = {("depth", "vgg16")}     # a plain chain has no residual branch to drop (tested: a clear error)


def small_model(name="resnet20", seed=0):
    torch.manual_seed(seed)
    kw = {"width_mult": 0.125} if name == "vgg16" else ({"width_mult": 0.5} if name == "mobilenetv2" else {})
    return create_model(name, **kw)


def masks_of(m):
    return {n: mod.weight_mask.clone() for n, mod in masked_modules(m)}


def test_every_registered_method_has_a_contract_config():
    assert set(METHOD_CONFIGS) == set(CONFIGS) | set(STRUCTURAL)


@pytest.mark.parametrize("method", sorted(STRUCTURAL))
@pytest.mark.parametrize("model_name", ["resnet20", "vgg16", "mobilenetv2"])
def test_structural_methods_shrink_a_copy_and_rebuild(method, model_name, tmp_path):
    from sparseforge.models import model_from_spec, read_state_dict
    from sparseforge.structured import count_macs
    import json

    m = small_model(model_name).eval()
    ref_state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    if (method, model_name) in NO_BLOCKS:
        with pytest.raises(sf.SparseforgeError, match="no residual block"):
            sf.prune(m, STRUCTURAL[method], example_input=x[:1])
        return
    p = sf.prune(m, STRUCTURAL[method], example_input=x[:1])
    assert p is not m and all(torch.equal(v, m.state_dict()[k]) for k, v in ref_state.items())
    assert count_macs(p, x) <= 0.5 * count_macs(m, x) + 1e-9
    path = save_weights(p, tmp_path / "p.safetensors")
    q = load_weights(model_from_spec(json.loads(read_state_dict(path)[1]["model"])), path).eval()
    p.eval()
    torch.testing.assert_close(q(x), p(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(STRUCTURAL))
def test_structural_methods_learn_after_pruning(method):
    """End to end on synthetic data: prune a trained net to half its MACs, fine-tune briefly, it still learns."""
    from sparseforge.data import BatchLoader, make_synthetic
    from sparseforge.train import TrainConfig, Trainer, evaluate

    m = small_model()
    cfg = TrainConfig(model="resnet20", epochs=1, batch_size=32, lr=0.05, max_steps_per_epoch=20, threads=2)
    data, test = make_synthetic(640), make_synthetic(256, seed=7)
    Trainer(m, cfg, BatchLoader(data, 32, shuffle=True), progress=False, log=lambda s: None).fit()
    p = sf.prune(m, STRUCTURAL[method], example_input=torch.randn(1, 3, 32, 32))
    Trainer(p, cfg, BatchLoader(data, 32, shuffle=True), progress=False, log=lambda s: None).fit()
    acc = evaluate(p, BatchLoader(test, 64))["acc"]
    assert acc > 40.0, acc     # 10 classes: chance is 10%


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_masks_are_zero_one_and_only_shrink(method):
    m = small_model()
    sf.prune(m, CONFIGS[method])
    first = masks_of(m)
    assert first, "no layer was masked"
    for t in first.values():
        assert set(t.unique().tolist()) <= {0.0, 1.0}
    # perturb weights, prune again: masks may only shrink
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))
    sf.prune(m, CONFIGS[method])
    for n, t in masks_of(m).items():
        assert bool((t <= first[n]).all()), n
    for n, mod in masked_modules(m):
        assert bool((mod.weight[mod.weight_mask == 0] == 0).all())


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_masks_survive_deepcopy_state_dict_and_safetensors(method, tmp_path):
    m = small_model()
    sf.prune(m, CONFIGS[method])
    ref = masks_of(m)
    c = copy.deepcopy(m)
    assert all(torch.equal(ref[n], t) for n, t in masks_of(c).items()) and masks_of(c).keys() == ref.keys()
    save_weights(m, tmp_path / "w.safetensors")
    fresh = load_weights(small_model(seed=1), tmp_path / "w.safetensors")
    assert masks_of(fresh).keys() == ref.keys()
    assert all(torch.equal(ref[n], t) for n, t in masks_of(fresh).items())
    x = torch.randn(2, 3, 32, 32)
    m.eval(), fresh.eval()
    torch.testing.assert_close(m(x), fresh(x))
    if method == "pattern":
        assert library_strings(fresh) == library_strings(m)


@pytest.mark.parametrize("model_name", ["resnet20", "vgg16", "mobilenetv2"])
@pytest.mark.parametrize("k", [4, 8, 12])
def test_pattern_shape_invariants(model_name, k):
    m = small_model(model_name)
    cfg = PatternConfig(num_patterns=k, connectivity="3.6x")
    sf.prune(m, cfg)
    lib = {tuple(p.tolist()) for p in m.sf_pattern_library}
    assert len(lib) == k
    for name, mod in m.named_modules():
        if not isinstance(mod, nn.Conv2d):
            continue
        mk = get_mask(mod)
        if mod.kernel_size == (3, 3) and mk is not None:
            per_kernel = mk.tensor.reshape(mod.weight.shape[0], mod.weight.shape[1], 9)
            counts = per_kernel.sum(-1)
            kept = per_kernel[counts > 0]
            assert bool((kept.sum(-1) == 4).all()) and bool((kept[:, 4] == 1).all())
            assert {tuple(r.tolist()) for r in kept} <= lib
            nz = (mod.weight.reshape_as(per_kernel) != 0)
            assert bool((nz <= (per_kernel > 0)).all())
            if mod.groups == 1:
                n = per_kernel.shape[0] * per_kernel.shape[1]
                assert abs(int((counts > 0).sum()) - round(n / 3.6)) <= 1, name
            else:  # depthwise: pattern only, every kernel kept
                assert bool((counts == 4).all())
        elif mod.kernel_size == (1, 1) and mk is not None:
            n = mod.weight.shape[0] * mod.weight.shape[1]
            assert abs(mk.kept() - round(n / 3.6)) <= 1


def test_excluded_layers_untouched():
    m = small_model()
    before = {n: p.clone() for n, p in m.named_parameters()}
    sf.prune(m, PatternConfig(connectivity=2.0, exclude=("layer3.*",)))
    assert get_mask(m.conv1) is None and get_mask(m.linear) is None
    for n, p in m.named_parameters():
        if n.startswith(("conv1.", "linear.", "layer3.")) or ".bn" in n:
            assert torch.equal(p, before[n]), n
    assert get_mask(m.layer3[0].conv1) is None and get_mask(m.layer2[0].conv1) is not None


@pytest.mark.parametrize("b", [2, 4, 16])
def test_channel_block_shares_pattern_and_kernels(b):
    m = small_model()
    sf.prune(m, PatternConfig(num_patterns=8, connectivity=3.6, channel_block=b))
    for n, mod in masked_modules(m):
        t = mod.weight_mask
        o = t.shape[0]
        for start in range(0, o, b):
            blk = t[start:start + b]
            assert all(torch.equal(blk[0], blk[j]) for j in range(1, blk.shape[0])), (n, start)


def test_global_connectivity_and_per_layer_override():
    m = small_model()
    sf.prune(m, PatternConfig(connectivity=4.0, connectivity_scope="global"))
    kept = sum(int((get_mask(mod).tensor.reshape(*mod.weight.shape[:2], 9).sum(-1) > 0).sum()) for _, mod in masked_modules(m))
    total = sum(mod.weight.shape[0] * mod.weight.shape[1] for _, mod in masked_modules(m))
    assert abs(kept - total / 4) <= len(list(masked_modules(m)))
    m2 = small_model()
    sf.prune(m2, PatternConfig(connectivity=2.0, connectivity_per_layer={"layer3.*": 0.1}))
    d3 = get_mask(m2.layer3[1].conv1).tensor.reshape(64, 64, 9).sum(-1).gt(0).float().mean().item()
    d1 = get_mask(m2.layer1[1].conv1).tensor.reshape(16, 16, 9).sum(-1).gt(0).float().mean().item()
    assert abs(d3 - 0.1) < 0.01 and abs(d1 - 0.5) < 0.01


def test_library_sources():
    m = small_model()
    sf.prune(m, PatternConfig(num_patterns=4, library="pconv"))
    assert torch.equal(m.sf_pattern_library, pconv_library(4))
    pats = ("010111000", "010011010", "000111010", "010110010")
    m2 = small_model()
    sf.prune(m2, PatternConfig(num_patterns=4, library="given", patterns=pats))
    assert library_strings(m2) == list(pats)
    assert len(all_candidates()) == 56


def test_extracted_library_is_top_k_by_best_fit():
    m = small_model()
    sf.prune(m, PatternConfig(num_patterns=6, connectivity=1.0))
    counts = m.sf_pattern_counts.tolist()
    assert counts == sorted(counts, reverse=True) and sum(counts) > 0


@pytest.mark.parametrize("bad,needle", [
    (dict(num_patterns=5), "accepted values: 4, 6, 8, 12"),
    (dict(connectivity="fast"), "use a reduction like '3.6x'"),
    (dict(connectivity="0.5x"), ">= 1x"),
    (dict(library="given", num_patterns=4, patterns=("111111111",) * 4), "9 characters|exactly 4 taps"),
    (dict(channel_block=3), "accepted values: 1, 2, 4"),
])
def test_pattern_config_errors(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        PatternConfig(**bad)


def test_config_round_trip():
    c = PatternConfig(num_patterns=12, connectivity="3.6x", connectivity_per_layer={"layer1.*": 0.5}, channel_block=2)
    assert PatternConfig.from_toml(c.to_toml()) == c
    a = ADMMConfig(rho=1e-2, target=c)
    assert ADMMConfig.from_toml(a.to_toml()) == a


def test_mask_value_object():
    with pytest.raises(SparseforgeError, match="only 0 and 1"):
        Mask(torch.tensor([0.0, 0.5]))
    a, b = Mask(torch.tensor([1.0, 1.0, 0.0])), Mask(torch.tensor([True, False, True]))
    assert (a & b).tensor.tolist() == [1.0, 0.0, 0.0] and (a & b).is_subset_of(a)


def test_magnitude_exact_sparsity():
    m = small_model()
    sf.prune(m, MagnitudeConfig(sparsity=0.875))
    total = sum(mod.weight.numel() for _, mod in masked_modules(m))
    zeros = sum(int((mod.weight_mask == 0).sum()) for _, mod in masked_modules(m))
    assert zeros == round(0.875 * total)
    m2 = small_model()
    sf.prune(m2, MagnitudeConfig(sparsity=0.5, scope="layer"))
    for _, mod in masked_modules(m2):
        assert abs(int((mod.weight_mask == 0).sum()) - mod.weight.numel() / 2) <= 1


def test_fold_masks_removes_buffers_keeps_outputs():
    m = small_model().eval()
    sf.prune(m, PatternConfig(connectivity=2.0))
    x = torch.randn(1, 3, 32, 32)
    y = m(x)
    sf.fold_masks(m)
    assert not list(masked_modules(m))
    torch.testing.assert_close(m(x), y)


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_masked_training_keeps_pruned_weights_exactly_zero(opt):
    from sparseforge.data import BatchLoader, make_synthetic
    from sparseforge.train import TrainConfig, Trainer

    m = small_model()
    cfg = TrainConfig(model="resnet20", epochs=2, batch_size=16, optimizer=opt, lr=0.05 if opt == "sgd" else 1e-3,
                      weight_decay=5e-3, momentum=0.9, nesterov=True, max_steps_per_epoch=6,
                      threads=torch.get_num_threads())
    data = make_synthetic(256)
    # build optimizer state *before* pruning, so stale momentum would move pruned weights if not masked
    t0 = Trainer(m, cfg, BatchLoader(data, 16, shuffle=True), progress=False, log=lambda s: None)
    t0.fit()
    sf.prune(m, PatternConfig(connectivity=3.6))
    t = Trainer(m, cfg, BatchLoader(data, 16, shuffle=True), optimizer=t0.optimizer, progress=False, log=lambda s: None)
    t.fit()
    assert t.step == 12
    for n, mod in masked_modules(m):
        pruned = mod.weight_mask == 0
        assert bool((mod.weight[pruned] == 0).all()), n
        for k, v in t.optimizer.state[mod.weight].items():
            if isinstance(v, torch.Tensor) and v.shape == pruned.shape:
                assert bool((v[pruned] == 0).all()), (n, k)
        assert bool((mod.weight[~pruned] != 0).any())


def test_admm_penalty_is_squared_frobenius_norm():
    m = small_model()
    cb = ADMMCallback(ADMMConfig(rho=0.3, target=PatternConfig(connectivity=2.0)))
    cb.setup(m)
    with torch.no_grad():
        for d in (cb.U, cb.V):
            for n in d:
                d[n].normal_()
    pen = cb.penalty()
    expect = 0.0
    for n, mod in cb._modules.items():
        if n in cb.Z:
            expect += ((mod.weight - cb.Z[n] + cb.U[n]) ** 2).sum()
        if n in cb.Y:
            expect += ((mod.weight - cb.Y[n] + cb.V[n]) ** 2).sum()
    torch.testing.assert_close(pen, 0.5 * 0.3 * expect)
    pen.backward()
    w = m.layer2[1].conv1
    n = "layer2.1.conv1"
    grad = 0.3 * ((w.weight - cb.Z[n] + cb.U[n]) + (w.weight - cb.Y[n] + cb.V[n]))
    torch.testing.assert_close(w.weight.grad, grad.detach())


def test_admm_projections_and_duals():
    m = small_model()
    cb = ADMMCallback(ADMMConfig(rho=1e-3, rho_factor=2.0, target=PatternConfig(num_patterns=4, connectivity=4.0)))
    cb.setup(m)
    rec = cb.update()
    assert cb.rho == pytest.approx(2e-3) and rec["update"] == 1
    n = "layer1.0.conv1"
    z = cb.Z[n].reshape(16, 16, 9)
    assert bool(((z != 0).sum(-1) <= 4).all())
    y = cb.Y[n].reshape(16, 16, 9)
    assert int(((y != 0).sum(-1) > 0).sum()) <= 64
    w = m.layer1[0].conv1.weight.detach()
    # scaled dual: U = (W - Z) * rho_old / rho_new after the rho increase
    torch.testing.assert_close(cb.U[n], (w - cb.Z[n]) * 0.5)
    # state round-trips through the checkpoint format
    from sparseforge.train.checkpoint import join_state, split_state
    tensors, skel = split_state(cb.state_dict(), "s")
    cb2 = ADMMCallback(cb.cfg)
    cb2.load_state_dict(join_state(skel, tensors))
    assert torch.equal(cb2.Z[n], cb.Z[n]) and cb2.rho == cb.rho and cb2.keep == cb.keep


def test_energy_connectivity_gives_small_layers_more_kernels_at_the_same_count():
    """'energy' ranks raw kernel energies across layers: a layer with larger weights keeps more, the total is exact."""
    m = small_model()
    with torch.no_grad():
        m.layer1[1].conv1.weight.mul_(10.0)     # one layer's kernels all outrank the rest
    sf.prune(m, PatternConfig(connectivity=4.0, connectivity_scope="energy"))
    kept = {n: int((get_mask(mod).tensor.reshape(*mod.weight.shape[:2], 9).sum(-1) > 0).sum())
            for n, mod in masked_modules(m)}
    total = sum(mod.weight.shape[0] * mod.weight.shape[1] for _, mod in masked_modules(m))
    assert abs(sum(kept.values()) - total / 4) <= len(kept)
    assert kept["layer1.1.conv1"] == 16 * 16          # the scaled layer keeps every kernel
    m2 = small_model()
    with torch.no_grad():
        m2.layer1[1].conv1.weight.mul_(10.0)
    sf.prune(m2, PatternConfig(connectivity=4.0, connectivity_scope="global"))   # normalised: scale-free
    d = get_mask(m2.layer1[1].conv1).tensor.reshape(16, 16, 9).sum(-1).gt(0).float().mean().item()
    assert d < 0.6


def test_magnitude_connectivity_gives_each_layer_the_share_global_magnitude_pruning_would():
    """'magnitude' keeps per layer the weight count global magnitude pruning leaves at the same total, in kernels of
    4 taps: a layer with 10x larger weights keeps every kernel, the rest share the remainder by their magnitudes."""
    m = small_model()
    with torch.no_grad():
        m.layer3[2].conv2.weight.mul_(0.1)     # one layer's weights all fall below the others'
        m.layer1[1].conv1.weight.mul_(10.0)
    ref = copy.deepcopy(m)
    sf.prune(m, PatternConfig(connectivity=4.0, connectivity_scope="magnitude"))
    kept = {n: int((get_mask(mod).tensor.reshape(*mod.weight.shape[:2], 9).sum(-1) > 0).sum())
            for n, mod in masked_modules(m)}
    kernels = {n: mod.weight.shape[0] * mod.weight.shape[1] for n, mod in masked_modules(m)}
    assert sum(kept.values()) == sum(round(k / 4) for k in kernels.values())
    assert kept["layer1.1.conv1"] == kernels["layer1.1.conv1"]
    assert kept["layer3.2.conv2"] <= 2
    # the uncapped layers: within a kernel of what magnitude pruning of them to the same weight count keeps there
    rest = [n for n in kernels if n != "layer1.1.conv1"]
    n_w = 4 * sum(kept[n] for n in rest)
    total = sum(9 * kernels[n] for n in rest)
    sf.prune(ref, MagnitudeConfig(sparsity=1 - n_w / total, scope="global", include=tuple(rest)))
    mag = {n: int(get_mask(mod).tensor.sum()) for n, mod in masked_modules(ref)}
    for n in rest:
        assert abs(kept[n] - mag[n] / 4) <= 1.0, (n, kept[n], mag[n] / 4)


def test_connectivity_1x1_prunes_1x1_convs_to_their_own_ratio():
    """connectivity 3.6 keeps 1/8 of a 3x3 conv's weights (4 of 9 taps x 1/3.6) but 1/3.6 of a 1x1 conv's;
    connectivity_1x1=8 brings the 1x1 convs to the same 1/8 and leaves every 3x3 conv as it was."""
    torch.manual_seed(0)
    a = sf.create_model("resnet18", num_classes=10)
    b = copy.deepcopy(a)
    sf.prune(a, PatternConfig(connectivity=3.6))
    sf.prune(b, PatternConfig(connectivity=3.6, connectivity_1x1=8.0))
    seen = set()
    for (n, ma), (_, mb) in zip(masked_modules(a), masked_modules(b)):
        da, db = ma.weight_mask.float().mean().item(), mb.weight_mask.float().mean().item()
        if ma.weight.shape[-1] == 1:
            assert abs(da - 1 / 3.6) < 0.01 and abs(db - 1 / 8) < 0.01, n
            seen.add(1)
        else:
            assert torch.equal(ma.weight_mask, mb.weight_mask), n
            seen.add(3)
    assert seen == {1, 3}
    with pytest.raises(ConfigError, match="connectivity_1x1"):
        PatternConfig(connectivity_1x1=8.0, connectivity_scope="global")
    with pytest.raises(ConfigError, match="connectivity"):
        PatternConfig(connectivity_1x1="eight")
