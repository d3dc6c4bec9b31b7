"""SSL group lasso and early-bird tickets: penalty gradients, removal, the distance rule."""

import types

import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.structured import (EarlyBirdCallback, EarlyBirdConfig, GroupLassoCallback, GroupLassoConfig,
                                    bn_channel_mask, count_params, early_bird_drawn, group_norms, mask_distance,
                                    ssl_remove)


def _train(model, cb, steps=60, lr=0.05):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    fake = types.SimpleNamespace(model=model, log=lambda s: None, should_stop=False)
    x = torch.randn(16, 3, 16, 16)
    y = torch.randint(0, 10, (16,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if cb is not None:
            cb.on_after_backward(fake)
        opt.step()
    return fake


def test_group_lasso_drives_group_norms_down_and_removal_shrinks_the_model():
    cfg = GroupLassoConfig(lambda_g=0.05, groups=("filter", "channel", "depth"), threshold=0.05)
    torch.manual_seed(0)
    m = sf.create_model("resnet20")
    before = group_norms(m, cfg)
    plain = sf.create_model("resnet20")
    plain.load_state_dict(m.state_dict())
    _train(plain, None)
    cb = GroupLassoCallback(cfg)
    fake = _train(m, cb)
    after, after_plain = group_norms(m, cfg), group_norms(plain, cfg)
    for k in ("filter", "channel", "depth"):
        assert after[k].mean() < 0.8 * after_plain[k].mean() and after[k].mean() < before[k].mean(), k
    cb.on_epoch_end(fake, 0, {})
    assert cb.history[0]["filter_mean"] == float(after["filter"].mean())
    x = torch.randn(2, 3, 32, 32)
    thr = float(after["filter"].median())       # a threshold half of the filters fall under
    small = ssl_remove(m, GroupLassoConfig(groups=("filter", "channel"), threshold=thr), x[:1])
    assert count_params(small) < 0.9 * count_params(m)
    rebuilt = sf.models.model_from_spec(small.sf_spec)
    assert count_params(rebuilt) == count_params(small)


def test_depth_removal_drops_a_whole_residual_branch():
    m = sf.create_model("resnet20").eval()
    with torch.no_grad():
        m.layer2[1].conv1.weight.mul_(1e-6)
        m.layer2[1].conv2.weight.mul_(1e-6)
    small = ssl_remove(m, GroupLassoConfig(groups=("depth",), threshold=1e-3), torch.randn(1, 3, 32, 32))
    assert small.layer2[1].branch_removed and small.layer2[1].conv1 is None
    assert not small.layer2[0].branch_removed
    assert small.sf_spec["arch"]["removed_branches"] == ["layer2.1"]
    rebuilt = sf.models.model_from_spec(small.sf_spec)
    assert rebuilt.layer2[1].branch_removed


def test_early_bird_distance_rule_on_a_crafted_sequence():
    base = torch.ones(100)
    seq = []
    for flips in (40, 30, 20, 5, 3, 2, 1, 0, 0):      # masks settle: distance to the newest shrinks
        m = base.clone()
        m[:flips] = 0
        seq.append(m)
    assert mask_distance(seq[0], seq[1]) == 0.10
    drawn = [i for i in range(1, len(seq) + 1) if early_bird_drawn(seq[:i], epsilon=0.1, window=5)]
    # at i=5 the window is 40,30,20,5,3 (max distance 0.37); at i=6: 30,20,5,3,2 (0.28); i=7: 20..1 (0.19);
    # i=8: 5,3,2,1,0 -> 0.05 <= 0.1
    assert drawn[0] == 8
    assert not early_bird_drawn(seq[:4], 0.1, 5)        # fewer than window masks: never


def test_early_bird_callback_penalises_bn_and_stops_training():
    torch.manual_seed(0)
    m = sf.create_model("resnet20")
    cb = EarlyBirdCallback(EarlyBirdConfig(ratio=0.3, lambda_bn=1e-2, epsilon=0.1, window=3))
    g0 = float(m.bn1.weight.abs().sum())
    fake = _train(m, cb, steps=20, lr=0.1)
    assert float(m.bn1.weight.abs().sum()) < g0
    for e in range(3):      # the weights no longer change: three identical masks draw the ticket
        cb.on_epoch_end(fake, e, {})
    assert cb.drawn_epoch == 3 and fake.should_stop
    assert int((bn_channel_mask(m, 0.3) == 0).sum()) == round(0.3 * sum(
        mm.num_features for mm in m.modules() if isinstance(mm, nn.BatchNorm2d)))


def test_proximal_group_lasso_reaches_exact_zeros():
    torch.manual_seed(0)
    m = sf.create_model("resnet20")
    cfg = GroupLassoConfig(lambda_g=12.0, groups=("filter",), proximal=True)   # shrink 0.6 per step
    cb = GroupLassoCallback(cfg)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    fake = types.SimpleNamespace(model=m, optimizer=opt)
    for _ in range(3):
        cb.on_step_end(fake)
    norms = group_norms(m, cfg)["filter"]
    assert int((norms == 0).sum()) > 0      # soft-thresholding: small groups become exactly zero
    small = ssl_remove(m, GroupLassoConfig(groups=("filter",), threshold=1e-12), torch.randn(1, 3, 32, 32))
    assert count_params(small) < count_params(m)


def test_growing_regularisation_fades_the_chosen_channels_so_removal_is_nearly_lossless():
    from sparseforge.structured import count_macs, growing_reg, remove_channels

    torch.manual_seed(0)
    m = sf.create_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    cfg = sf.StructuredConfig(mac_ratio=0.6, regularize_epochs=1, reg_max=1.0)
    cb, dg, rem = growing_reg(m, cfg, x)
    assert rem and cb.slices
    abrupt = remove_channels(m, dg, rem)          # what removing at once would give, from the same start
    m.train()
    fake = types.SimpleNamespace(model=m, total_steps=60)
    cb.on_train_begin(fake)
    rms0, kept0 = cb.history[0]["removed_rms"], cb.history[0]["kept_rms"]
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    xb, yb = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    lams = []
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(m(xb), yb).backward()
        cb.on_after_backward(fake)
        opt.step()
        lams.append(cb.lam())
        cb.on_step_end(fake)
    assert lams[0] == 0 and abs(lams[30] - 1.0) < 1e-9 and lams == sorted(lams)     # rises over half, then holds
    cb.on_epoch_end(fake, 0, {})
    rms1 = cb.history[-1]["removed_rms"]
    assert rms1 < 0.05 * rms0 and cb.history[-1]["kept_rms"] > 0.2 * kept0
    m.eval()
    small = remove_channels(m, dg, rem)
    assert count_macs(small, x) == count_macs(abrupt, x) <= 0.6 * count_macs(m, x) * 1.01
    with torch.no_grad():
        full, pruned = m(xb), small(xb)
    # the faded channels contribute almost nothing any more: removing them barely changes the outputs
    assert (full - pruned).abs().max() <= 0.05 * full.abs().max()


def test_growing_regularisation_needs_a_single_step():
    import pytest

    from sparseforge.config import ConfigError

    with pytest.raises(ConfigError, match="steps=1"):
        sf.StructuredConfig(mac_ratio=0.5, regularize_epochs=1, steps=2)
