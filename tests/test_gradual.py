"""Gradual pruning (cubic schedule, Zhu & Gupta 2017): the schedule, masks that only shrink and end exactly at the
target, the same final masks as one-shot pruning would count, and a learning check on synthetic data."""

import pytest
import torch

import sparseforge as sf
from sparseforge.recipe import Recipe, RecipeRunner
from sparseforge.sparsity import masked_modules
from sparseforge.sparsity.gradual import GradualConfig, apply_fraction, schedule_fraction


def test_cubic_schedule():
    assert schedule_fraction(0, 100) == 0.0
    assert schedule_fraction(100, 100) == 1.0 and schedule_fraction(250, 100) == 1.0
    assert schedule_fraction(50, 100) == pytest.approx(1 - 0.5 ** 3)
    fr = [schedule_fraction(t, 100) for t in range(101)]
    assert all(b >= a for a, b in zip(fr, fr[1:]))
    # most of the pruning happens early, while the network still has its capacity
    assert schedule_fraction(30, 100) > 0.6


def _kept(model):
    return sum(int(m.weight_mask.sum()) for _, m in masked_modules(model))


@pytest.mark.parametrize("target", ["pattern", "magnitude"])
def test_masks_shrink_monotonically_and_end_at_the_target(target):
    torch.manual_seed(0)
    m = sf.create_model("resnet18", num_classes=10)      # 3x3 and 1x1 convs (connectivity_1x1 ramps too)
    ref = sf.create_model("resnet18", num_classes=10)
    ref.load_state_dict(m.state_dict())
    pc = sf.PatternConfig(num_patterns=8, connectivity="3.6x", connectivity_1x1=8.0)
    cfg = GradualConfig(target=pc, magnitude=0.8 if target == "magnitude" else 0.0)
    prev_masks, kept = None, []
    for frac in (0.0, 0.3, 0.7, 1.0):
        apply_fraction(m, cfg, frac)
        masks = {n: mod.weight_mask.clone() for n, mod in masked_modules(m)}
        if prev_masks is not None:
            assert all(bool((masks[n] <= prev_masks[n]).all()) for n in masks)
        prev_masks = masks
        kept.append(_kept(m))
        if frac == 0.0 and target == "pattern":     # nothing of a 1x1 conv is cut before the ramp starts
            assert all(bool(mod.weight_mask.all()) for _, mod in masked_modules(m) if mod.weight.shape[-1] == 1)
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    if target == "pattern":
        sf.prune(ref, pc)        # the same target in one shot keeps the same number of weights
        assert kept[-1] == _kept(ref)
        for _, mod in masked_modules(m):
            if mod.weight.shape[-1] == 3:
                assert bool(((mod.weight_mask.sum((2, 3)) == 0) | (mod.weight_mask.sum((2, 3)) == 4)).all())
    else:
        total = sum(mod.weight.numel() for _, mod in masked_modules(m))
        assert abs(1 - kept[-1] / total - 0.8) < 1e-3


@pytest.mark.parametrize("pattern_ramp", [False, True])
def test_gradual_stage_learns_and_reaches_the_target(tmp_path, pattern_ramp):
    """Learning check: from a trained smallcnn, a gradual stage to 4x (patterns + 1.78x connectivity) with KD
    from the start keeps the synthetic task far above chance, and ends with exactly the target's masks (with the
    patterns' taps ramped too or cut at step 0)."""
    rec = Recipe.from_dict({
        "model": "smallcnn", "dataset": "synthetic",
        "train": {"batch_size": 32, "lr": 0.05, "schedule": "onecycle", "train_size": 640, "test_size": 200,
                  "threads": 1},
        "stage": [{"method": "finetune", "epochs": 3},
                  {"method": "gradual", "epochs": 3, "update_every": 5, "ramp": 0.6, "teacher": "stage:0",
                   "pattern_ramp": pattern_ramp, "target": {"num_patterns": 4, "connectivity": "1.78x"}}]})
    res = RecipeRunner(rec, tmp_path / "run", progress=False).run()
    dense_acc, final_acc = res["stages"][0]["eval"]["acc"], res["stages"][1]["eval"]["acc"]
    hist = res["stages"][1]["gradual"]
    assert hist[0]["fraction"] == 0.0 and hist[-1]["fraction"] == 1.0 and len(hist) > 3
    assert dense_acc > 40 and final_acc > max(40, dense_acc - 10), (dense_acc, final_acc)   # chance: 10%
    assert res["sparsity"]["compression_conv_linear"] > 2.5
    if pattern_ramp:
        assert hist[0]["extra_taps"] == 5 and hist[-1]["extra_taps"] == 0


def test_regrow_trains_the_pruned_weights_and_shows_the_masked_ones():
    """Straight-through (SR-STE): between steps the model holds dense * mask (what evaluation sees), the shadow's
    pruned weights keep moving, masks change during the ramp, and at the end the masks are frozen at the target."""
    from sparseforge.data.dataset import BatchLoader
    from sparseforge.data.synthetic import synthetic_splits
    from sparseforge.sparsity.gradual import GradualCallback
    from sparseforge.train import Callback, Trainer, TrainConfig

    torch.manual_seed(0)
    m = sf.create_model("smallcnn", num_classes=10)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    cfg = GradualConfig(epochs=2, update_every=3, ramp=0.8, teacher="", regrow=True,
                        target=sf.PatternConfig(num_patterns=4, connectivity="2x"))
    gcb = GradualCallback(cfg)
    seen = {"checked": 0, "moved": 0, "first": 0}

    class Probe(Callback):
        def on_train_begin(self, trainer):
            # after the first cut the shadow still holds the cut weights' values (a pruned weight is not zeroed)
            for n, dense in gcb.shadow.items():
                assert torch.equal(dense, start[f"{n}.weight"]), n
            seen["first"] = len(gcb.shadow)

        def on_step_end(self, trainer):
            if not gcb.shadow:
                return
            mods = dict(trainer.model.named_modules())
            for n, dense in gcb.shadow.items():
                w, mk = mods[n].weight, gcb.masks[n]
                assert torch.equal(w, dense * mk)
                assert getattr(mods[n], "weight_mask", None) is None      # no buffer until the masks freeze
                seen["moved"] += int(((dense != 0) & (mk == 0)).sum())
            seen["checked"] += 1

    tr_ds, te_ds = synthetic_splits(320, 64)
    train, test = BatchLoader(tr_ds, 32, shuffle=True, drop_last=True), BatchLoader(te_ds, 64)
    tr = Trainer(m, TrainConfig(model="smallcnn", epochs=2, lr=0.05, threads=1), train, test,
                 callbacks=[gcb, Probe()], log=lambda s: None, progress=False)
    tr.fit()
    assert seen["first"] > 0 and seen["checked"] > 5 and seen["moved"] > 0
    assert sum(h.get("regrow_changed", 0) for h in gcb.history) > 0         # kernels changed pattern or came back
    assert gcb.history[-1]["fraction"] == 1.0 and not gcb.shadow
    ref = sf.create_model("smallcnn", num_classes=10)
    sf.prune(ref, cfg.target)
    assert _kept(m) == _kept(ref)
    for _, mod in masked_modules(m):
        assert bool((mod.weight[mod.weight_mask == 0] == 0).all())
        if mod.weight.shape[-1] == 3:
            assert bool(((mod.weight_mask.sum((2, 3)) == 0) | (mod.weight_mask.sum((2, 3)) == 4)).all())


@pytest.mark.slow
def test_regrow_killed_mid_ramp_resumes_to_identical_weights(tmp_path):
    """The shadow weights and the masks in force live in the callback's checkpoint state: a SIGKILL inside the
    ramp resumes to exactly the weights of an uninterrupted run."""
    import signal
    from pathlib import Path

    from safetensors.torch import load_file

    import test_recipe
    from recipe_util import recipe_toml

    rp = tmp_path / "r.toml"
    rp.write_text(recipe_toml("""
[[stage]]
method = "gradual"
epochs = 2
update_every = 2
ramp = 0.9
teacher = ""
regrow = true
[stage.target]
num_patterns = 4
connectivity = "2x"
""", schedule="onecycle", train_size=320, test_size=64, checkpoint_every=3))
    r = test_recipe._child(rp, tmp_path / "a")
    assert r.returncode == 0, r.stderr
    r = test_recipe._child(rp, tmp_path / "b", "00-gradual", 8)      # after the step-6 checkpoint, mid-ramp
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = test_recipe._child(rp, tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert "resumed from step-000000006" in r.stderr
    wa, wb = load_file(str(Path(tmp_path / "a/model.safetensors"))), load_file(str(tmp_path / "b/model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_pattern_ramp_starts_dense_and_ends_at_exact_patterns():
    """pattern_ramp: at fraction 0 every tap is kept, the taps per kernel fall on the schedule (masks never grow),
    and at 1 every kept kernel is one library pattern, with the same weight count as the one-shot target."""
    torch.manual_seed(0)
    m = sf.create_model("resnet20")
    ref = sf.create_model("resnet20")
    ref.load_state_dict(m.state_dict())
    pc = sf.PatternConfig(num_patterns=8, connectivity="3.6x", connectivity_scope="energy")
    cfg = GradualConfig(target=pc, pattern_ramp=True)
    prev, taps = None, []
    for frac in (0.0, 0.2, 0.5, 0.8, 1.0):
        info = apply_fraction(m, cfg, frac)
        masks = {n: mod.weight_mask.clone() for n, mod in masked_modules(m) if mod.weight.shape[-1] == 3}
        if prev is not None:
            assert all(bool((masks[n] <= prev[n]).all()) for n in masks)
        prev = masks
        per_kernel = torch.cat([t.sum((2, 3)).flatten() for t in masks.values()])
        taps.append(int(per_kernel.max()))
        if frac == 0.0:
            assert info["extra_taps"] == 5 and bool((per_kernel == 9).all())
    assert taps[0] == 9 and taps[-1] == 4 and taps == sorted(taps, reverse=True)
    lib = {tuple(p.flatten().tolist()) for p in m.sf_pattern_library}
    for t in prev.values():
        k = t.reshape(-1, 9)
        kept = k[k.sum(1) > 0]
        assert all(tuple(r.tolist()) in lib for r in kept)
    sf.prune(ref, pc)
    assert _kept(m) == _kept(ref)


def test_pattern_ramp_with_a_magnitude_target_is_refused_in_one_line():
    from sparseforge.errors import ConfigError
    with pytest.raises(ConfigError, match="pattern_ramp"):
        GradualConfig(magnitude=0.8, pattern_ramp=True)
