"""Structured pruning contracts: surgery equals zeroing, groups, importance, targets, save/rebuild."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.models import model_from_spec, save_weights, load_weights
from sparseforge.models.cifar_resnet import PadShortcut
from sparseforge.structured import (IMPORTANCE, CostModel, StructuredConfig, count_macs, count_params, groups,
                                    remove_channels, score_groups, select_step, zero_channels)
from recipe_util import recipe_toml


def _model(name):
    torch.manual_seed(0)
    m = sf.create_model(name).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):   # non-trivial BN statistics and affine parameters
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.2, 1.5)
            mod.bias.data.normal_(0, 0.2)
    return m


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16", "mobilenetv2"])
def test_surgery_equals_zeroing_and_rebuilds_without_pickle(name, tmp_path):
    m = _model(name)
    x = torch.randn(3, 3, 32, 32)
    dg = groups(m, x[:1])
    base = CostModel(dg).cost(np.array([], dtype=np.int64))
    rem = select_step(m, dg, StructuredConfig(mac_ratio=0.5), 1, base)
    assert rem
    small = remove_channels(m, dg, rem).eval()
    zeroed = copy.deepcopy(m)
    zero_channels(zeroed, dg, rem)
    with torch.no_grad():
        assert _rel(small(x), zeroed(x)) <= 1e-5
    assert count_params(small) < count_params(m)
    # save -> rebuild from the JSON spec in the file's metadata -> identical outputs
    path = save_weights(small, tmp_path / "small.safetensors")
    from sparseforge.models import read_state_dict
    import json

    spec = json.loads(read_state_dict(path)[1]["model"])
    rebuilt = load_weights(model_from_spec(spec), path).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), small(x))


def test_prune_meets_mac_and_param_targets_within_round_to():
    m = _model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    for ratio in (0.7, 0.5, 0.35):
        p = sf.prune(m, StructuredConfig(mac_ratio=ratio), example_input=x)
        r = count_macs(p, x) / count_macs(m, x)
        assert ratio - 0.02 <= r <= ratio + 1e-9, r
    p = sf.prune(m, StructuredConfig(param_ratio=0.5), example_input=x)
    assert 0.48 <= count_params(p) / count_params(m) <= 0.5 + 1e-9
    # round_to=8: every pruned width a multiple of 8 and the target met within one step of 8 channels per group
    p = sf.prune(m, StructuredConfig(mac_ratio=0.5, round_to=8), example_input=x)
    for mod in p.modules():
        if isinstance(mod, nn.Conv2d) and mod.out_channels != 10:
            assert mod.out_channels % 8 == 0, mod
    assert count_macs(p, x) / count_macs(m, x) <= 0.5 + 1e-9
    # per-layer scope moves every group in steps of 8 at once (0.335 here); steps handed back bring it to the target
    pl = sf.prune(m, StructuredConfig(mac_ratio=0.5, round_to=8, scope="layer"), example_input=x)
    assert 0.48 <= count_macs(pl, x) / count_macs(m, x) <= 0.5 + 1e-9
    assert all(mod.out_channels % 8 == 0 for mod in pl.modules() if isinstance(mod, nn.Conv2d) and mod.out_channels != 10)
    # iterative schedule reaches the same target
    p3 = sf.prune(m, StructuredConfig(mac_ratio=0.5, steps=3), example_input=x)
    assert 0.47 <= count_macs(p3, x) / count_macs(m, x) <= 0.5 + 1e-9
    # the input model is untouched
    assert count_macs(m, x) == count_macs(_model("resnet20"), x)


def test_group_types_residual_concat_depthwise():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 6, 3, padding=1)
            self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14)
            self.bn = nn.BatchNorm2d(14)
            self.c = nn.Conv2d(14, 14, 1)
            self.fc = nn.Linear(14, 5)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            y = torch.relu(self.bn(self.dw(y)))
            y = self.c(y) + y                      # residual: c's filters tied to a/b's channels
            return self.fc(y.mean((2, 3)))

    net = Net().eval()
    dg = groups(net, torch.randn(1, 3, 8, 8))
    gs = dg.groups()
    ga, gb = [g for g in gs if g.name == "a"][0], [g for g in gs if g.name == "b"][0]
    for g, n in ((ga, 8), (gb, 6)):   # a's and b's channels: each tied through concat, depthwise, residual
        assert {"concat", "depthwise", "residual"} <= g.kinds and len(g) == n and not g.blocked
        assert {"dw", "bn", "c", "fc"} <= set(g.modules)
    fc = [g for g in gs if g.name == "fc"][0]
    assert fc.blocked == "network output"
    # removing 4 channels: concat parts, depthwise groups and the linear's inputs shrink together
    rem = set(ga.roots[:2] + gb.roots[:2])
    small = remove_channels(net, dg, rem).eval()
    assert small.a.out_channels + small.b.out_channels == 10 and small.dw.groups == 10 and small.fc.in_features == 10
    z = copy.deepcopy(net)
    zero_channels(z, dg, rem)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _rel(small(x), z(x)) <= 1e-5


def test_pad_shortcut_couples_stages_and_keeps_option_a():
    m = _model("resnet20")
    dg = groups(m, torch.randn(1, 3, 32, 32))
    stem = [g for g in dg.groups() if g.name == "conv1"][0]
    # stage-1 stream (16) is tied to the middle 16 channels of stage 2 and 3 through the zero-pad shortcuts
    assert "layer2.0.conv2" in stem.modules and "layer3.0.conv2" in stem.modules and len(stem) == 16
    small = remove_channels(m, dg, set(stem.roots[:4]))
    sc = small.layer2[0].shortcut
    assert isinstance(sc, PadShortcut) and (sc.pad_before, sc.pad_after) == (8, 8)
    assert small.layer2[0].conv2.out_channels == 28


@pytest.mark.parametrize("criterion", sorted(IMPORTANCE))
def test_importance_criteria_rank_a_weak_channel_last(criterion):
    m = _model("vgg16")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():       # channel 5 of features.0: tiny filter, tiny BN scale, tiny consumer slice
        m.features[0].weight[5] *= 1e-3
        m.features[1].weight[5] = 1e-3
        m.features[1].bias[5] = 0
        m.features[3].weight[:, 5] *= 1e-3
    if criterion == "taylor":
        nn.functional.cross_entropy(m(x), torch.tensor([1, 2])).backward()
    gs = groups(m, x[:1]).groups()
    s = score_groups(m, gs, criterion)[0]
    assert int(torch.argmin(s)) == 5, s


def test_taylor_without_gradients_is_a_clear_error():
    m = _model("resnet20")
    with pytest.raises(sf.SparseforgeError, match="needs gradients"):
        sf.prune(m, StructuredConfig(mac_ratio=0.5, importance="taylor"), example_input=torch.randn(1, 3, 32, 32))


def test_ignored_layers_and_bad_configs():
    m = _model("vgg16")
    x = torch.randn(1, 3, 32, 32)
    p = sf.prune(m, StructuredConfig(ratio=0.5, scope="layer", ignored_layers=("features.0",)), example_input=x)
    assert p.features[0].out_channels == 64 and p.features[3].out_channels == 32
    # global scope: the same share of all prunable channels, spread by (normalised) importance
    g = sf.prune(m, StructuredConfig(ratio=0.5, ignored_layers=("features.0",)), example_input=x)
    convs = lambda mm: [c.out_channels for c in mm.modules() if isinstance(c, nn.Conv2d)][1:]   # noqa: E731
    assert g.features[0].out_channels == 64 and abs(sum(convs(g)) - sum(convs(m)) / 2) <= 1
    with pytest.raises(sf.SparseforgeError, match="exactly one target"):
        StructuredConfig()
    with pytest.raises(sf.SparseforgeError, match="example_input"):
        sf.prune(m, StructuredConfig(ratio=0.5))


def test_explain_reports_what_cannot_be_grouped():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)
            self.g = nn.Conv2d(8, 8, 3, groups=2)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.logsumexp(self.g(self.c(x)), dim=(2, 3)))

    text = groups(Odd(), torch.randn(1, 3, 12, 12)).explain()
    assert "grouped conv" in text and "BLOCKED" in text and "could not be grouped" in text


# ---- depth (layer) pruning ------------------------------------------------------------------------------------

def _batches(n=2, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def _quiet(m, name, scale=1e-3):
    """Make one block's branch nearly silent (its last BN scales the output by ~0)."""
    bn = dict(m.named_modules())[name].bn2
    bn.weight.data.fill_(scale)
    bn.bias.data.zero_()


@pytest.mark.parametrize("importance", ["bn", "output"])
def test_depth_criteria_drop_the_silent_branch_first(importance):
    m = _model("resnet20")
    _quiet(m, "layer2.1")
    p = sf.prune(m, sf.DepthConfig(blocks=1, importance=importance), example_input=torch.randn(1, 3, 32, 32),
                 calibration=_batches())
    assert [h["block"] for h in p.sf_depth_history] == ["layer2.1"]
    assert dict(p.named_modules())["layer2.1"].branch_removed
    assert not getattr(dict(m.named_modules())["layer2.1"], "branch_removed", False)   # input model untouched


def test_depth_meets_mac_target_minimally_and_equals_zeroed_branches(tmp_path):
    m = _model("resnet20")
    x = torch.randn(3, 3, 32, 32)
    base = count_macs(m, x[:1])
    p = sf.prune(m, sf.DepthConfig(mac_ratio=0.6, importance="bn"), example_input=x[:1]).eval()
    gone = [h["block"] for h in p.sf_depth_history]
    macs = sf.structured.block_macs(m, x[:1])
    assert count_macs(p, x[:1]) <= 0.6 * base
    assert count_macs(p, x[:1]) + macs[gone[-1]] > 0.6 * base       # one block fewer would miss the target
    assert count_macs(p, x[:1]) == base - sum(macs[b] for b in gone)
    mods = dict(p.named_modules())
    for name in ("layer2.0", "layer3.0"):                          # downsampling blocks are never dropped
        assert name not in gone and not mods[name].branch_removed
    # the same function as the original network with those branches silenced
    zeroed = copy.deepcopy(m)
    for b in gone:
        _quiet(zeroed, b, 0.0)
    with torch.no_grad():
        assert _rel(p(x), zeroed(x)) <= 1e-5
    path = save_weights(p, tmp_path / "shallow.safetensors")
    from sparseforge.models import read_state_dict
    import json

    spec = json.loads(read_state_dict(path)[1]["model"])
    assert sorted(spec["arch"]["removed_branches"]) == sorted(gone)
    rebuilt = load_weights(model_from_spec(spec), path).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), p(x))
    # the compiler runs the shallower net natively: a dropped branch's relu(x) of a ReLU output is an alias
    engine = sf.compile(p, x[:1], threads=1)
    assert all(op["native"] for op in engine.spec["ops"])
    with torch.no_grad():
        assert _rel(engine(x), p(x)) <= 1e-4


def test_depth_loss_criterion_is_greedy_and_composes_with_width_pruning():
    import torch.nn.functional as F

    m = _model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    cal = _batches()

    def loss(net):
        with torch.no_grad():
            return sum(float(F.cross_entropy(net(a), b, reduction="sum")) for a, b in cal) / 32

    p = sf.prune(m, sf.DepthConfig(blocks=3, importance="loss"), example_input=x, calibration=cal)
    hist = p.sf_depth_history
    # every step dropped the block whose removal raised the calibration loss least, given the earlier drops
    cur = copy.deepcopy(m)
    for h in hist:
        ref = loss(cur)
        deltas = {}
        for name in sf.structured.candidate_blocks(cur, sf.DepthConfig(blocks=1)):
            trial = copy.deepcopy(cur)
            dict(trial.named_modules())[name].remove_branch()
            deltas[name] = loss(trial) - ref
        assert h["block"] == min(deltas, key=deltas.get)
        assert h["score"] == pytest.approx(deltas[h["block"]], abs=1e-5)
        dict(cur.named_modules())[h["block"]].remove_branch()
    assert len(hist) == 3 and len({h["block"] for h in hist}) == 3
    assert all(h["mac_ratio"] > hist[i + 1]["mac_ratio"] for i, h in enumerate(hist[:-1]))
    both = sf.prune(p, StructuredConfig(mac_ratio=0.5), example_input=x)
    assert count_macs(both, x) <= 0.5 * count_macs(p, x)
    assert sum(getattr(b, "branch_removed", False) for b in both.modules()) == 3


def test_depth_bad_input_is_a_clear_error():
    m = _model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(sf.SparseforgeError, match="calibration"):
        sf.prune(m, sf.DepthConfig(blocks=1, importance="loss"), example_input=x)
    with pytest.raises(Exception, match="exactly one target"):
        sf.DepthConfig(blocks=1, mac_ratio=0.5)
    with pytest.raises(sf.SparseforgeError, match="reaches only"):
        sf.prune(m, sf.DepthConfig(mac_ratio=0.05, importance="bn"), example_input=x)
    with pytest.raises(sf.SparseforgeError, match="no residual block"):
        sf.prune(sf.create_model("vgg16"), sf.DepthConfig(blocks=1, importance="bn"), example_input=x)
    assert sf.DepthConfig.from_toml(sf.DepthConfig(mac_ratio=0.5).to_toml()) == sf.DepthConfig(mac_ratio=0.5)


def test_growing_depth_fades_the_chosen_branches_so_dropping_them_costs_little():
    """Growing regularisation of whole blocks: the chosen branches' last BN goes to ~0 while training, the rest
    does not; dropping them afterwards changes the output far less than dropping them from the start model."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    m = _model("resnet20").train()
    x0 = torch.randn(1, 3, 32, 32)
    cal = _batches(n=4, bs=16, seed=1)
    plan = sf.structured.plan_depth(m, sf.DepthConfig(blocks=3, importance="bn"), x0, cal)
    blocks = [h["block"] for h in plan]
    assert len(blocks) == 3 and all(not getattr(b, "branch_removed", False) for b in m.modules())  # plan only
    probe = torch.randn(8, 3, 32, 32)

    def drop_change(net):
        net = net.eval()
        with torch.no_grad():
            return _rel(sf.structured.drop_blocks(net, blocks).eval()(probe), net(probe))

    before = drop_change(copy.deepcopy(m))
    steps = 60
    cb = sf.structured.growing_depth(m, blocks, reg_max=2.0)
    t = SimpleNamespace(total_steps=steps, model=m)
    cb.on_train_begin(t)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    m.train()
    for i in range(steps):
        x, y = cal[i % len(cal)]
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        cb.on_after_backward(t)
        opt.step()
        cb.on_step_end(t)
    mods = dict(m.named_modules())
    faded = max(float(mods[b].bn2.weight.detach().abs().max()) for b in blocks)
    kept = min(float(mods[n].bn2.weight.detach().abs().mean()) for n in sf.structured.candidate_blocks(
        m, sf.DepthConfig(blocks=1)) if n not in blocks)
    assert faded < 0.1 * kept, (faded, kept)      # start: every |gamma| in [0.2, 1.5]
    after = drop_change(m)
    assert after < 0.2 * before, (before, after)
    with pytest.raises(sf.SparseforgeError, match="not a residual block"):
        sf.structured.drop_blocks(m, ["linear"])
    with pytest.warns(UserWarning, match="needs training"):
        sf.prune(m, sf.DepthConfig(blocks=1, importance="bn", regularize_epochs=1), example_input=x0)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_depth_loss_replay_equals_full_forwards(name):
    """The greedy search replays the recorded outputs of the blocks before the dropped one: the same losses as full
    forwards; a block called twice per forward (shared weights) switches the replay off."""
    import torch.nn.functional as F

    from sparseforge.structured.depth import _Dropped, _Replay

    m = _model(name)
    cal = _batches(n=2, bs=8, seed=3)

    def full():
        with torch.no_grad():
            return sum(float(F.cross_entropy(m(a), b, reduction="sum")) for a, b in cal) / 16

    r = _Replay(m, cal)
    assert r.ok and r.ref == pytest.approx(full(), rel=1e-6)
    names = sf.structured.candidate_blocks(m, sf.DepthConfig(blocks=1))
    assert len(names) >= 3
    for n in names:
        with _Dropped(dict(m.named_modules())[n]):
            want = full()
        assert r.loss_without(n) == pytest.approx(want, rel=1e-6), n
    assert not any("forward" in vars(b) for b in r.blocks.values())      # every replay undone

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model("resnet20")

        def forward(self, x):
            return self.net.linear(torch.nn.functional.adaptive_avg_pool2d(
                self.net.layer1(self.net.layer1(torch.relu(self.net.bn1(self.net.conv1(x))))), 1).flatten(1)[:, :16]
                .repeat(1, 4))

    t = Twice().eval()
    assert not _Replay(t, cal).ok


def test_bench_record_keeps_results_and_rebuilds_architecture(tmp_path):
    """bench/structured.py's <arm>.record.json is what survives a new machine (run directories are not committed):
    it must hold every stage's result, the per-epoch metrics and an architecture that rebuilds the pruned net."""
    import importlib.util
    import json
    from pathlib import Path

    from sparseforge.models import read_state_dict
    from sparseforge.recipe import Recipe, RecipeRunner

    spec = importlib.util.spec_from_file_location("bench_structured", Path(__file__).parents[1] / "bench" / "structured.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = Recipe.from_toml(recipe_toml("""
[[stage]]
method = "depth"
blocks = 2
importance = "bn"
[[stage]]
method = "finetune"
epochs = 2
""", model="resnet20", batch_size=16, lr=0.02, train_size=64, test_size=32))
    d = tmp_path / "exp" / "arm"
    res = RecipeRunner(rc, d, progress=False).run()
    assert bench.record_arm(tmp_path / "exp" / "missing") is None
    bench.record_arm(d)
    rec = json.loads((tmp_path / "exp" / "arm.record.json").read_text())
    assert rec["finished"] and rec["final_acc"] == res["final"]["acc"]
    assert [s["done"] for s in rec["stages"]] == [True, True]
    assert [m["epoch"] for m in rec["stages"][1]["metrics"] if m.get("split") == "train"] == [1, 2]
    final = load_weights(model_from_spec(json.loads(read_state_dict(d / "model.safetensors")[1]["model"])),
                         d / "model.safetensors")
    rebuilt = model_from_spec(rec["model_spec"])
    assert count_params(rebuilt) == count_params(final) < count_params(sf.create_model("resnet20"))
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in final.named_parameters()]


def test_inplace_subnet_shares_weights_keeps_its_own_bn_statistics_and_equals_the_dropped_net():
    """In-place depth distillation's sub-network: the model's parameters (same objects), BatchNorm statistics of its
    own (a training forward moves only its statistics), and in eval mode exactly what drop_blocks gives."""
    from sparseforge.structured import shared_subnet

    m = _model("resnet20")
    blocks = ["layer1.1", "layer2.2", "layer3.1"]
    sub = shared_subnet(m, blocks)
    params = dict(m.named_parameters())
    assert all(p is params[n] for n, p in sub.named_parameters())
    assert not any(b is mb for b, mb in zip(sub.buffers(), m.buffers()))
    assert not any(getattr(b, "branch_removed", False) for b in m.modules())       # the model keeps every branch
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert _rel(sub.eval()(x), sf.structured.drop_blocks(m, blocks).eval()(x)) < 1e-6
        before = {k: v.clone() for k, v in m.state_dict().items()}
        sub.train()(x)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(sub.layer1[0].bn1.running_mean, m.layer1[0].bn1.running_mean)
    with pytest.raises(sf.SparseforgeError, match="not a residual block"):
        shared_subnet(m, ["linear"])


def test_inplace_step_adds_the_shallow_nets_distillation_gradient_and_resumes_its_statistics():
    """One step of InplaceDepthCallback: the gradient is that of CE(full) + kd(shallow, full.detach()) computed on an
    independent copy (branches switched off in place); the skipped blocks get only the full net's gradient. Its
    state (history, the sub-network's BN statistics) survives a checkpoint round trip."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from sparseforge.distill import kd_loss
    from sparseforge.structured import InplaceDepthCallback
    from sparseforge.train.checkpoint import join_state, split_state

    blocks = ["layer1.1", "layer2.2", "layer3.1"]
    m = _model("resnet20").train()
    ref, plain = copy.deepcopy(m), copy.deepcopy(m)
    x, y = _batches(n=1, bs=8, seed=3)[0]
    t = SimpleNamespace(model=m, config=SimpleNamespace(compile=False), log=lambda s: None, test_loader=None,
                        is_main=True)
    cb = InplaceDepthCallback(blocks, T=2.0, alpha=0.5, weight=1.0)
    cb.on_train_begin(t)
    logits = m(x)
    total = cb.on_loss(t, F.cross_entropy(logits, y), logits, x, y)
    total.backward()

    full = ref(x)
    mods = dict(ref.named_modules())
    for b in blocks:
        mods[b].branch_removed = True
    shallow = ref(x)
    for b in blocks:
        del mods[b].branch_removed
    (F.cross_entropy(full, y) + kd_loss(shallow, full.detach(), T=2.0, alpha=0.5, targets=y)).backward()
    F.cross_entropy(plain(x), y).backward()
    rp, pp = dict(ref.named_parameters()), dict(plain.named_parameters())
    for n, p in m.named_parameters():
        assert _rel(p.grad, rp[n].grad) < 1e-5, n
        if n.startswith(tuple(b + "." for b in blocks)):
            assert _rel(p.grad, pp[n].grad) < 1e-5, n           # skipped branch: the full net's gradient only
    assert _rel(m.layer3[0].conv1.weight.grad, pp["layer3.0.conv1.weight"].grad) > 1e-3   # shared: both nets'

    cb.on_epoch_end(t, 0, {})
    tensors, skel = split_state(cb.state_dict(), "cb")
    cb2 = InplaceDepthCallback(blocks, T=2.0, alpha=0.5)
    cb2.load_state_dict(join_state(skel, tensors))
    cb2.on_train_begin(t)
    assert cb2.history == cb.history
    for (k, v), (k2, v2) in zip(cb.sub.named_buffers(), cb2.sub.named_buffers()):
        assert k == k2 and torch.equal(v, v2)
    assert not torch.equal(cb2.sub.layer3[0].bn1.running_mean, m.layer3[0].bn1.running_mean)   # its own input
    with pytest.raises(sf.SparseforgeError, match="other blocks"):
        InplaceDepthCallback(["layer1.0"]).load_state_dict(cb.state_dict())
    from sparseforge.config import ConfigError

    with pytest.raises(ConfigError, match="not both"):
        sf.DepthConfig(blocks=2, regularize_epochs=1, inplace_epochs=1)


def test_inplace_warmup_ramps_the_shallow_nets_loss_weight_from_the_step_count():
    from types import SimpleNamespace

    import torch.nn.functional as F

    from sparseforge.structured import InplaceDepthCallback

    m = _model("resnet20").train()
    x, y = _batches(n=1, bs=8, seed=4)[0]
    t = SimpleNamespace(model=m, config=SimpleNamespace(compile=False), log=lambda s: None, step=0,
                        steps_per_epoch=10)
    cb = InplaceDepthCallback(["layer1.1", "layer3.2"], warmup_epochs=2.0)
    cb.on_train_begin(t)
    logits = m(x)
    loss = F.cross_entropy(logits, y)
    assert cb.on_loss(t, loss, logits, x, y) is loss            # step 0: the full net alone
    for step, w in ((5, 0.25), (20, 1.0), (35, 1.0)):
        t.step = step
        total = cb.on_loss(t, loss, logits, x, y)
        assert float(total - loss) == pytest.approx(w * cb.last_sub_loss, rel=1e-5)
