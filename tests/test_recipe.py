import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparseforge.cli import main
from sparseforge.errors import ConfigError, RunDirError
from sparseforge.recipe import Recipe, RecipeRunner
from recipe_util import recipe_toml

HERE = Path(__file__).parent
RECIPE = recipe_toml("""
[[stage]]
method = "admm"
epochs = 1
update_every = 4
[stage.target]
num_patterns = 4
connectivity = "2x"
[[stage]]
method = "finetune"
epochs = 2
""", schedule='onecycle', train_size=320, test_size=100, checkpoint_every=3)


def _child(recipe, run_dir, marker="", step=0):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    return subprocess.run([sys.executable, str(HERE / "_recipe_child.py"), str(recipe), str(run_dir), marker, str(step)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_recipe_killed_mid_stage_resumes_without_redoing_stages(tmp_path):
    rp = tmp_path / "r.toml"
    rp.write_text(RECIPE)
    r = _child(rp, tmp_path / "a")
    assert r.returncode == 0, r.stderr
    r = _child(rp, tmp_path / "b", "01-finetune", 14)  # finetune: 10 steps/epoch; dies in epoch 2 after the step-12 checkpoint
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (tmp_path / "b/stages/00-admm/done.json").exists() and not (tmp_path / "b/stages/01-finetune/done.json").exists()
    r = _child(rp, tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert "stage 0 (admm): already done" in r.stderr
    assert "resumed from step-000000012" in r.stderr
    wa = load_file(str(tmp_path / "a/model.safetensors"))
    wb = load_file(str(tmp_path / "b/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    res = json.loads((tmp_path / "b/results.json").read_text())
    report = (tmp_path / "b/report.md").read_text()
    assert f"{res['final']['acc']:.2f}%" in report
    assert "## Pattern library" in report and (tmp_path / "b/pattern_library.png").exists()
    assert len(res["sparsity"]["library"]) == 4


@pytest.mark.slow
def test_recipe_killed_inside_admm_stage_resumes(tmp_path):
    """The ADMM stage stores the pattern library on the model mid-stage; resuming must recreate that buffer."""
    rp = tmp_path / "r.toml"
    rp.write_text(RECIPE.replace("epochs = 1\nupdate_every", "epochs = 2\nupdate_every"))
    r = _child(rp, tmp_path / "a")
    assert r.returncode == 0, r.stderr
    r = _child(rp, tmp_path / "b", "00-admm", 14)   # after the step-12 checkpoint, in ADMM epoch 2
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = _child(rp, tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert "resumed from step-000000012" in r.stderr
    wa = load_file(str(tmp_path / "a/model.safetensors"))
    wb = load_file(str(tmp_path / "b/model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_recipe_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'prune'"):
        Recipe.from_toml('model="smallcnn"\n[[stage]]\nmethod="prune"\n')
    with pytest.raises(ConfigError, match="at least one"):
        Recipe.from_toml('model="smallcnn"\n')
    with pytest.raises(ConfigError, match=r"stage\[0\] \(pattern\).*unknown field 'connectivty'"):
        Recipe.from_toml('model="smallcnn"\n[[stage]]\nmethod="pattern"\nconnectivty=2\n')
    with pytest.raises(ConfigError, match="stage\\[0\\].train.*unknown field 'lrr'"):
        Recipe.from_toml('model="smallcnn"\n[[stage]]\nmethod="finetune"\n[stage.train]\nlrr=1\n')


def test_recipe_model_args_build_the_model_and_reach_its_checkpoint(tmp_path, tiny_recipe):
    """model_args (a RepGhostNet's width): the run trains that network, the saved model rebuilds it from its own
    metadata, and options the model does not take are refused when the recipe is read, in one line."""
    import json

    import sparseforge as sf
    from sparseforge.models import model_from_spec, read_state_dict

    r = Recipe.from_dict({**tiny_recipe({"method": "finetune", "epochs": 1}, model="repghostnet").to_dict(),
                          "model_args": {"width": 0.5}})
    RecipeRunner(r, tmp_path / "r", progress=False).run()
    spec = json.loads(read_state_dict(tmp_path / "r" / "model.safetensors")[1]["model"])
    assert spec["name"] == "repghostnet" and spec["kwargs"] == {"width": 0.5}
    wide = sf.create_model("repghostnet", width=1.0)
    narrow = sf.load_weights(model_from_spec(spec), tmp_path / "r" / "model.safetensors")
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters()) / 2
    with pytest.raises(ConfigError, match=r"Recipe.model_args: .*repghostnet.*depth") as e:
        Recipe.from_dict({**r.to_dict(), "model_args": {"depth": 3}})
    assert "\n" not in str(e.value)


def test_different_recipe_in_same_run_dir_refused(tmp_path):
    r1 = Recipe.from_toml(RECIPE.replace("epochs = 2", "epochs = 1"))
    RecipeRunner(r1, tmp_path / "r", progress=False).run()
    r2 = Recipe.from_toml(RECIPE)
    with pytest.raises(RunDirError, match="different recipe"):
        RecipeRunner(r2, tmp_path / "r", progress=False).run(resume=True)
    # where it trains is not what it computes: the same recipe on another device resumes (here: finds it done)
    r1_cpu = Recipe.from_dict({**r1.to_dict(), "train": {**r1.train, "device": "cpu"}})
    assert r1_cpu != r1 and r1_cpu.identity() == r1.identity()
    RecipeRunner(r1_cpu, tmp_path / "r", progress=False).run(resume=True)


def test_recipe_run_directory_is_locked(tmp_path):
    """A recipe run holds its directory's lock: another run on it is refused before anything is written."""
    from sparseforge.utils import RunLock

    with RunLock(tmp_path / "r"):
        with pytest.raises(RunDirError, match="in use by another sparseforge run"):
            RecipeRunner(Recipe.from_toml(RECIPE), tmp_path / "r", progress=False).run()
    assert not (tmp_path / "r" / "recipe.toml").exists()


def test_compress_cli_with_overrides(tmp_path, capsys):
    rp = tmp_path / "r.toml"
    rp.write_text(RECIPE)
    rc = main(["compress", str(rp), "--run-dir", str(tmp_path / "run"), "--set", "stage.1.epochs=1",
               "--set", "train.lr=0.02", "--no-progress"])
    assert rc == 0
    saved = Recipe.from_toml((tmp_path / "run/recipe.toml").read_text())
    assert saved.stages()[1].config.epochs == 1 and saved.train["lr"] == 0.02
    assert "report:" in capsys.readouterr().out
    # the same command again resumes (nothing redone)
    rc = main(["compress", str(rp), "--run-dir", str(tmp_path / "run"), "--set", "stage.1.epochs=1",
               "--set", "train.lr=0.02", "--no-progress"])
    assert rc == 0


def test_shipped_recipes_parse():
    r = Recipe.load_file(HERE.parent / "recipes" / "resnet20-pattern8x.toml")
    st = r.stages()
    assert [s.method for s in st] == ["gradual", "compile", "robustness"]
    assert st[0].config.target.num_patterns == 8
    models = {Recipe.load_file(p).model for p in (HERE.parent / "recipes").glob("*.toml")}
    assert {"resnet20", "resnet56", "vgg16", "mobilenetv2"} <= models


STRUCTURED_RECIPE = recipe_toml("""
[[stage]]
method = "earlybird"
epochs = 2
ratio = 0.25
window = 2
epsilon = 1.0
[[stage]]
method = "ssl"
epochs = 1
lambda_g = 1e-3
groups = ["filter", "channel", "depth"]
threshold = 1e-6
[[stage]]
method = "structured"
mac_ratio = 0.5
importance = "taylor"
round_to = 4
[[stage]]
method = "finetune"
epochs = 1
""", model="resnet20", train_size=256)


def test_structured_stages_run_resume_and_report_widths(tmp_path):
    from sparseforge.structured import count_macs

    rp = tmp_path / "s.toml"
    rp.write_text(STRUCTURED_RECIPE)
    recipe = Recipe.load_file(rp)
    res = RecipeRunner(recipe, tmp_path / "run", log=lambda s: None, progress=False).run()
    eb = res["stages"][0]["earlybird"]
    assert eb["drawn_epoch"] == 2            # epsilon 1.0, window 2: drawn as soon as two masks exist
    gn = res["stages"][1]["group_norms"]
    assert [r["epoch"] for r in gn] == [0, 1]
    text = (tmp_path / "run/report.md").read_text()
    assert "## Structure" in text and "-> " in text
    # a finished structural stage reloads at its pruned size; resuming redoes nothing
    logs = []
    res2 = RecipeRunner(recipe, tmp_path / "run", log=logs.append, progress=False).run(resume=True)
    assert sum("already done" in s for s in logs) == 4
    assert res2["final"]["acc"] == res["final"]["acc"]
    from sparseforge.models import model_from_spec, read_state_dict, load_weights

    path = tmp_path / "run/model.safetensors"
    m = load_weights(model_from_spec(json.loads(read_state_dict(path)[1]["model"])), path)
    full = model_from_spec({"name": "resnet20"})
    x = torch.randn(1, 3, 32, 32)
    assert count_macs(m, x) <= 0.5 * 0.75 * count_macs(full, x) + 1e-9


TRAINING_RECIPE = recipe_toml("""
[[stage]]
method = "mix"
epochs = 1
kind = "hmix"
ratio = 0.5
[[stage]]
method = "mix"
epochs = 1
kind = "gmix"
[[stage]]
method = "rdrop"
epochs = 1
alpha = 0.5
[[stage]]
method = "pattern"
connectivity = "2x"
[[stage]]
method = "kd"
epochs = 1
teacher = "start"
rkd_distance = 25.0
rkd_angle = 50.0
graph = 25.0
taps = ["features.0", "features.3"]
""", batch_size=31, train_size=124)


def test_regulariser_and_distillation_stages_run_masked(tmp_path):
    from sparseforge.sparsity import masked_modules

    rp = tmp_path / "t.toml"
    rp.write_text(TRAINING_RECIPE)
    logs = []
    runner = RecipeRunner(Recipe.load_file(rp), tmp_path / "run", log=logs.append, progress=False)
    res = runner.run()
    assert any("R-Drop on a model without dropout" in s for s in logs)
    assert len(res["stages"]) == 5 and all(s["eval"]["acc"] >= 0 for s in res["stages"])
    m = runner.model
    for _, mod in masked_modules(m):     # the kd stage trained the pattern-pruned model with masks on
        assert bool((mod.weight[mod.weight_mask == 0] == 0).all())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


LOWBIT_RECIPE = recipe_toml("""
[[stage]]
method = "pattern"
connectivity = "2x"
[[stage]]
method = "pow2"
epochs = 1
[[stage]]
method = "precision"
epochs = 2
period = 1
window = 2
epsilon = 10.0
""", train_size=192)


def test_lowbit_stages_fold_to_plain_convs_and_report_savings(tmp_path):
    rp = tmp_path / "l.toml"
    rp.write_text(LOWBIT_RECIPE)
    runner = RecipeRunner(Recipe.load_file(rp), tmp_path / "run", log=lambda s: None, progress=False)
    res = runner.run()
    st = res["stages"][1]["storage_bits"]
    assert st["pow2"] < st["fp32"]
    pr = res["stages"][2]["precision"]
    assert pr["final_stage"] == 3 and len(pr["switch_steps"]) == 3 and 0 < pr["saved"] < 1
    assert all(type(m) is torch.nn.Conv2d for m in runner.model.modules() if isinstance(m, torch.nn.Conv2d))
    logs = []
    RecipeRunner(Recipe.load_file(rp), tmp_path / "run", log=logs.append, progress=False).run(resume=True)
    assert sum("already done" in s for s in logs) == 3


INT8_RECIPE = recipe_toml("""
[[stage]]
method = "pattern"
connectivity = "2x"
[[stage]]
method = "finetune"
epochs = 1
[[stage]]
method = "int8"
max_images = 64
runs = 5
""", train_size=192)


def test_int8_stage_reports_accuracy_before_and_after_and_exports_qdq(tmp_path):
    """Pruning, fine-tuning, then post-training int8: accuracy before/after (integer reference) in results and the
    report, a QDQ ONNX whose outputs are the reference's, onnxruntime latency; the recipe's model stays float."""
    ort = pytest.importorskip("onnxruntime")
    rp = tmp_path / "q.toml"
    rp.write_text(INT8_RECIPE)
    runner = RecipeRunner(Recipe.load_file(rp), tmp_path / "run", log=lambda s: None, progress=False)
    res = runner.run()
    q = res["stages"][2]["int8"]
    assert q["calibration_images"] == 64 and q["calibration"] in ("minmax", "percentile", "mse")
    assert abs(q["delta_pt"] - (q["acc_int8"] - q["acc_fp32"])) < 1e-9 and q["acc_fp32"] == res["stages"][1]["eval"]["acc"]
    assert set(q["latency"]["arms"]) == {"sparseforge-int8", "onnxruntime-fp32", "onnxruntime-int8 (sparseforge QDQ)"}
    assert "int8 engine:" in q["latency"]["engine"]
    onnx_path = next((tmp_path / "run" / "stages").glob("02-*/model-int8.onnx"))
    x = runner.state.example()
    out = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert out.shape == (1, 10) and np.isfinite(out).all()
    assert all(type(m) is torch.nn.Conv2d for m in runner.model.modules() if isinstance(m, torch.nn.Conv2d))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## int8 (stage 2)" in report and "onnxruntime-int8 (sparseforge QDQ)" in report


KD_FROM_STAGE_RECIPE = recipe_toml("""
[[stage]]
method = "finetune"
epochs = 1
[[stage]]
method = "structured"
mac_ratio = 0.6
[[stage]]
method = "kd"
epochs = 1
teacher = "stage:0"
""")


def test_kd_teacher_from_an_earlier_stage(tmp_path):
    """A pruned net distils from the dense model stage 0 produced (not the recipe's start weights)."""
    rp = tmp_path / "t.toml"
    rp.write_text(KD_FROM_STAGE_RECIPE)
    runner = RecipeRunner(Recipe.load_file(rp), tmp_path / "run", progress=False)
    res = runner.run()
    assert len(res["stages"]) == 3
    t = runner.context(len(res["stages"]) - 1).teacher("stage:0")
    from sparseforge.models import load_weights, model_from_spec, read_state_dict

    p = next((tmp_path / "run" / "stages").glob("00-*/model.safetensors"))
    ref = load_weights(model_from_spec(json.loads(read_state_dict(p)[1]["model"])), p)
    for (k, a), (_, b) in zip(t.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    start = runner.state.start_model.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in t.state_dict().items() if k in start)  # trained, not start
    bad = KD_FROM_STAGE_RECIPE.replace('teacher = "stage:0"', 'teacher = "stage:2"')
    rp.write_text(bad)
    with pytest.raises(ConfigError, match="earlier stage"):
        Recipe.load_file(rp)


DEPTH_RECIPE = recipe_toml("""
[[stage]]
method = "finetune"
epochs = 1
[[stage]]
method = "depth"
blocks = 2
importance = "loss"
calibration_batches = 2
[[stage]]
method = "kd"
epochs = 1
teacher = "stage:0"
""", model="resnet20")


def test_depth_stage_drops_branches_saves_the_shallow_net_and_resumes(tmp_path):
    from sparseforge.models import load_weights, model_from_spec, read_state_dict

    rp = tmp_path / "d.toml"
    rp.write_text(DEPTH_RECIPE)
    recipe = Recipe.load_file(rp)
    res = RecipeRunner(recipe, tmp_path / "run", log=lambda s: None, progress=False).run()
    hist = res["stages"][1]["depth"]
    assert len(hist) == 2 and res["stages"][1]["bn_recalibrated_batches"] > 0
    for path in (tmp_path / "run/stages/01-depth/model.safetensors", tmp_path / "run/model.safetensors"):
        m = load_weights(model_from_spec(json.loads(read_state_dict(path)[1]["model"])), path)
        assert sorted(n for n, b in m.named_modules() if getattr(b, "branch_removed", False)) == \
            sorted(h["block"] for h in hist)
    text = (tmp_path / "run/report.md").read_text()
    assert "residual branches removed (2 of 9 blocks)" in text
    assert "in before -> after" not in text          # no width changed: no empty width table
    logs = []
    res2 = RecipeRunner(recipe, tmp_path / "run", log=logs.append, progress=False).run(resume=True)
    assert sum("already done" in s for s in logs) == 3 and res2["final"] == res["final"]


def test_depth_stage_with_growing_regularisation_fades_then_drops_and_resumes(tmp_path):
    """regularize_epochs: the plan is written before training (a resumed stage fades the same blocks), the branches
    fade during the stage, and the dropped net is what the stage saves."""
    from sparseforge.models import load_weights, model_from_spec, read_state_dict

    rp = tmp_path / "d.toml"
    rp.write_text(DEPTH_RECIPE.replace('calibration_batches = 2', 'calibration_batches = 2\nregularize_epochs = 2\n'
                                       'reg_max = 2.0'))
    recipe = Recipe.load_file(rp)
    assert recipe.stages()[1].config.regularize_epochs == 2
    res = RecipeRunner(recipe, tmp_path / "run", log=lambda s: None, progress=False).run()
    st = res["stages"][1]
    plan = json.loads((tmp_path / "run/stages/01-depth/depth_plan.json").read_text())
    assert [h["block"] for h in st["depth"]] == [h["block"] for h in plan] and len(plan) == 2
    gr = st["growing_reg"]
    assert gr[0]["lambda"] == 0 and gr[-1]["lambda"] == pytest.approx(2.0)
    assert gr[-1]["removed_rms"] < 0.5 * gr[0]["removed_rms"]          # the chosen branches' BN faded
    assert st["train"]["epoch"] == 2 and st["acc_before_drop"] is not None
    path = tmp_path / "run/model.safetensors"
    m = load_weights(model_from_spec(json.loads(read_state_dict(path)[1]["model"])), path)
    assert sorted(n for n, b in m.named_modules() if getattr(b, "branch_removed", False)) == \
        sorted(h["block"] for h in plan)
    logs = []
    res2 = RecipeRunner(recipe, tmp_path / "run", log=logs.append, progress=False).run(resume=True)
    assert sum("already done" in s for s in logs) == 3 and res2["final"] == res["final"]


@pytest.mark.slow
def test_depth_stage_trained_in_place_drops_the_planned_blocks_and_resumes(tmp_path):
    """inplace_epochs: the plan is written before training, every epoch records the shallow sub-network's and the
    full net's test accuracy, the saved net is the shallow one, it learned (far above chance on the synthetic
    classes), and a resumed run redoes nothing."""
    from sparseforge.models import load_weights, model_from_spec, read_state_dict

    rp = tmp_path / "d.toml"
    rp.write_text(DEPTH_RECIPE.replace('calibration_batches = 2', 'calibration_batches = 2\ninplace_epochs = 3')
                  .replace("train_size = 128", "train_size = 512").replace("test_size = 64", "test_size = 256"))
    recipe = Recipe.load_file(rp)
    assert recipe.stages()[1].config.inplace_epochs == 3
    res = RecipeRunner(recipe, tmp_path / "run", log=lambda s: None, progress=False).run()
    st = res["stages"][1]
    plan = json.loads((tmp_path / "run/stages/01-depth/depth_plan.json").read_text())
    assert [h["block"] for h in st["depth"]] == [h["block"] for h in plan] and len(plan) == 2
    assert [r["epoch"] for r in st["inplace"]] == [1, 2, 3] and st["train"]["epoch"] == 3
    assert all("sub_test_acc" in r and "full_test_acc" in r for r in st["inplace"])
    assert st["acc_before_drop"] == st["inplace"][-1]["sub_test_acc"]
    assert st["eval"]["acc"] > 40, st      # 10 synthetic classes: chance is 10%
    path = tmp_path / "run/model.safetensors"
    m = load_weights(model_from_spec(json.loads(read_state_dict(path)[1]["model"])), path)
    assert sorted(n for n, b in m.named_modules() if getattr(b, "branch_removed", False)) == \
        sorted(h["block"] for h in plan)
    logs = []
    res2 = RecipeRunner(recipe, tmp_path / "run", log=logs.append, progress=False).run(resume=True)
    assert sum("already done" in s for s in logs) == 3 and res2["final"] == res["final"]


ONLINE_KD_RECIPE = recipe_toml("""
[[stage]]
method = "depth"
blocks = 3
importance = "bn"
[[stage]]
method = "kd"
epochs = 2
teacher = "start"
online = true
""", model="resnet20", train_size=256)


def test_online_kd_stage_trains_the_dense_control_alongside_the_student(tmp_path):
    """kd with online = true and teacher = 'start': the teacher, trained on the same batches at the same schedule, is
    the dense control (equal to a finetune stage of the same budget up to float noise); it is saved beside the
    student with its test accuracy, and the student is the pruned net."""
    from sparseforge.models import load_weights, model_from_spec, read_state_dict
    from sparseforge.train import evaluate

    runner = RecipeRunner(Recipe.from_toml(ONLINE_KD_RECIPE), tmp_path / "online", progress=False)
    res = runner.run()
    st = res["stages"][1]
    assert [h["epoch"] for h in st["online_teacher"]] == [1, 2]
    p = tmp_path / "online" / "stages" / "01-kd" / "teacher.safetensors"
    teacher = load_weights(model_from_spec(json.loads(read_state_dict(p)[1]["model"])), p).eval()
    control_rc = ONLINE_KD_RECIPE.split("[[stage]]")[0] + '[[stage]]\nmethod = "finetune"\nepochs = 2\n'
    control_runner = RecipeRunner(Recipe.from_toml(control_rc), tmp_path / "control", progress=False)
    control_runner.run()
    q = tmp_path / "control" / "model.safetensors"
    control = load_weights(model_from_spec(json.loads(read_state_dict(q)[1]["model"])), q).eval()
    start = runner.state.start_model.state_dict()
    moved = 0
    for k, v in control.state_dict().items():
        assert torch.allclose(teacher.state_dict()[k].float(), v.float(), rtol=1e-4, atol=1e-5), k
        moved += not torch.equal(v, start[k])
    assert moved > 10
    _, el = runner.state.loaders()
    assert st["teacher_acc"] == pytest.approx(evaluate(teacher, el)["acc"])
    student = tmp_path / "online" / "model.safetensors"
    spec = json.loads(read_state_dict(student)[1]["model"])
    assert len(spec["arch"]["removed_branches"]) == 3


def test_kill_between_engine_save_and_stage_completion_reruns_to_the_same_results(tmp_path):
    """A compile stage killed after its engine was saved but before it was marked done: the rerun replaces the
    leftover engine (results.json names it, never null) and removes temp files killed writers left behind."""
    rec = Recipe.from_toml(RECIPE.split("[[stage]]")[0] + '[[stage]]\nmethod = "finetune"\nepochs = 1\n'
                           '[[stage]]\nmethod = "compile"\nruns = 5\nonnxruntime = false\n')
    run = tmp_path / "r"
    first = RecipeRunner(rec, run, progress=False).run()
    sdir = run / "stages" / "01-compile"
    assert first["stages"][1]["engine_dir"] == str(sdir / "engine")
    # the kill: done.json and everything after it never written; a torn temp file and a half-written artefact
    (sdir / "done.json").unlink()
    (run / "model.safetensors").unlink()
    (sdir / ".done.json.abcd1234.tmp").write_text("{")
    (sdir / "engine2.tmp-write").mkdir()
    again = RecipeRunner(rec, run, progress=False).run(resume=True)
    assert again["stages"][1]["engine_dir"] == first["stages"][1]["engine_dir"]
    assert "engine_save_error" not in again["stages"][1]
    assert not (sdir / ".done.json.abcd1234.tmp").exists() and not (sdir / "engine2.tmp-write").exists()
    saved = json.loads((run / "results.json").read_text())
    assert saved["stages"][1]["engine_dir"] == first["stages"][1]["engine_dir"]
    assert saved["final"] == first["final"]
    import sparseforge as sf

    model = sf.create_model("smallcnn")
    sf.load_weights(model, run / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(sf.load_engine(sdir / "engine")(x), model.eval()(x), atol=1e-5)
