"""Lottery tickets: exact per-round fractions, shrink-only masks, exact rewinding, resumable rounds."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import sparseforge as sf
from sparseforge.errors import ConfigError
from sparseforge.recipe import Recipe, RecipeRunner
from sparseforge.sparsity import masked_modules
from sparseforge.tickets import IMPConfig, imp_prune, prunable, rewind_step, rewind_weights
from recipe_util import recipe_toml


def _alive(m, cfg):
    return sum(int(mod.weight_mask.sum()) for _, mod in prunable(m, cfg))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_each_round_removes_the_fraction_of_survivors_exactly_and_masks_shrink(scope):
    torch.manual_seed(0)
    m = sf.create_model("resnet20")
    cfg = IMPConfig(fraction=0.2, scope=scope)
    total = sum(mod.weight.numel() for _, mod in prunable(m, cfg))
    alive, prev = total, None
    counts = [mod.weight.numel() for _, mod in prunable(m, cfg)]        # per-layer survivors before a round
    for r in range(4):
        imp_prune(m, cfg)
        now = _alive(m, cfg)
        if scope == "global":
            assert now == alive - round(0.2 * alive), (r, now, alive)
        else:
            after = [int(mod.weight_mask.sum()) for _, mod in prunable(m, cfg)]
            assert after == [n - round(0.2 * n) for n in counts], r
            counts = after
        masks = {n: mod.weight_mask.clone() for n, mod in masked_modules(m)}
        if prev is not None:
            assert all(bool((masks[n] <= prev[n]).all()) for n in masks)
        prev = masks
        with torch.no_grad():       # training would move weights; pruned ones must stay out
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        sf.sparsity.apply_masks(m)
        alive = now
    assert not any(n == sf.sparsity.scope.first_conv_name(m) for n, _ in prunable(m, cfg))


def test_rewinding_restores_exactly_the_stored_weights_for_unpruned_entries():
    torch.manual_seed(0)
    m = sf.create_model("resnet20")
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3).add_(1)
    imp_prune(m, IMPConfig(fraction=0.5))
    rewind_weights(m, snap)
    for n, mod in masked_modules(m):
        keep = mod.weight_mask > 0
        assert torch.equal(mod.weight[keep], snap[n + ".weight"][keep])
        assert bool((mod.weight[~keep] == 0).all())
    assert torch.equal(m.bn1.weight, snap["bn1.weight"])


def test_rewind_units():
    assert rewind_step("lr", 10) is None and rewind_step("init", 10) == 0 and rewind_step("pretrained", 10) == -1
    assert rewind_step("500it", 10) == 500 and rewind_step("2ep", 10) == 20
    with pytest.raises(ConfigError, match="500it"):
        IMPConfig(rewind="2 epochs")


IMP_RECIPE = recipe_toml("""
[[stage]]
method = "imp"
rounds = 2
fraction = 0.3
epochs = 1
rewind = "2it"
kd = true
""", train_size=192)


def test_imp_recipe_rounds_resume_to_the_same_masks(tmp_path):
    rp = tmp_path / "r.toml"
    rp.write_text(IMP_RECIPE)
    rc = Recipe.load_file(rp)
    res = RecipeRunner(rc, tmp_path / "a", log=lambda s: None, progress=False).run()
    rounds = res["stages"][0]["imp_rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[1]["kept"] < rounds[0]["kept"]
    # simulate a crash after round 0: drop later rounds, rerun -> identical masks and weights
    RecipeRunner(rc, tmp_path / "b", log=lambda s: None, progress=False).run()
    sd = tmp_path / "b/stages/00-imp"
    for d in ("round-1", "final"):
        shutil.rmtree(sd / d)
    (sd / "done.json").unlink()
    (tmp_path / "b/model.safetensors").unlink()
    logs = []
    RecipeRunner(rc, tmp_path / "b", log=logs.append, progress=False).run(resume=True)
    wa, wb = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    masks = [k for k in wa if k.endswith("weight_mask")]
    assert masks and all(torch.equal(wa[k], wb[k]) for k in masks)
    assert all(torch.allclose(wa[k], wb[k]) for k in wa)
