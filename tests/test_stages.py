"""Recipe stages are registered objects (issue 24): a registry-driven contract over every one, a toy stage added
with one decorator, and a runner that branches on no method name."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sparseforge.config import Config, opt
from sparseforge.recipe import RecipeRunner
from sparseforge.stages import STAGES, StageMethod, register_stage

SRC = Path(__file__).resolve().parents[1] / "src" / "sparseforge"

# the smallest settings that exercise each stage (a stage without an entry runs with its defaults, epochs = 1)
CONTRACT = {
    "admm": {"update_every": 1, "target": {"num_patterns": 4, "connectivity": "2x"}},
    "gradual": {"update_every": 1, "target": {"num_patterns": 4, "connectivity": "2x"}},
    "pattern": {"num_patterns": 4, "connectivity": "2x"},
    "structured": {"ratio": 0.25},
    "depth": {"blocks": 1, "calibration_batches": 1},
    "earlybird": {"epochs": 2, "window": 2},
    "imp": {"rounds": 1},
    "compile": {"runs": 5, "onnxruntime": False},
    "robustness": {"eps": [0.1], "samples": 4, "perturbations": 2},
    "int8": {"max_images": 64, "runs": 5, "calibration": "minmax"},
}
NEEDS_RESIDUALS = {"depth"}      # removes residual branches: smallcnn has none
MODEL_FOR = {"reparameterize": "repghostnet"}   # needs re-parameterizable blocks


def _stage(name: str) -> dict:
    d = {"method": name, **CONTRACT.get(name, {})}
    if "epochs" in {f.name for f in dataclasses.fields(STAGES.get(name).config)} and "epochs" not in d:
        d["epochs"] = 1
    return d


def test_every_recipe_method_is_a_registered_stage():
    assert set(STAGES.names()) >= {"finetune", "admm", "gradual", "pattern", "magnitude", "structured", "depth",
                                   "ssl", "earlybird", "imp", "kd", "rdrop", "mix", "pow2", "precision", "compile",
                                   "robustness"}
    for name, cls in STAGES.items():
        assert issubclass(cls, StageMethod) and cls.name == name
        assert dataclasses.is_dataclass(cls.config) and issubclass(cls.config, Config), name


def test_contract_entries_name_registered_stages():
    assert set(CONTRACT) <= set(STAGES.names())


@pytest.mark.parametrize("name", STAGES.names())
def test_stage_contract(name, tiny_recipe, tmp_path):
    """Every registered stage: runs in a recipe, returns a model that still classifies, writes a JSON-able
    record; a stage that prunes gets BatchNorm re-estimated; a rerun loads the finished stage instead of redoing it."""
    model = "resnet20" if name in NEEDS_RESIDUALS else MODEL_FOR.get(name, "smallcnn")
    recipe = tiny_recipe(_stage(name), model=model)
    runner = RecipeRunner(recipe, tmp_path / "run", log=lambda s: None, progress=False)
    res = runner.run()
    done = json.loads(next((tmp_path / "run" / "stages").glob("00-*/done.json")).read_text())
    assert done["method"] == name and "acc" in done["eval"]
    if STAGES.get(name).prunes:
        assert done["bn_recalibrated_batches"] > 0
    else:
        assert "bn_recalibrated_batches" not in done
    x = runner.state.example()
    with torch.no_grad():
        out = runner.model.eval()(x)
    assert out.shape == (1, runner.state.train_ds.num_classes) and torch.isfinite(out).all()
    logs = []
    again = RecipeRunner(recipe, tmp_path / "run", log=logs.append, progress=False).run(resume=True)
    assert any("already done" in line for line in logs)
    assert again["final"] == res["final"]


@dataclasses.dataclass(frozen=True)
class ToyConfig(Config):
    scale: float = opt(2.0, "multiply the classifier's bias by this")


def test_a_new_stage_is_one_decorator(tiny_recipe, tmp_path):
    @register_stage("toy-scale", ToyConfig)
    class ToyScale(StageMethod):
        def run(self, ctx, model):
            lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
            with torch.no_grad():
                lin.bias.mul_(ctx.config.scale)
            return model, {"scaled": ctx.config.scale, "stage_dir": ctx.dir.name}

    try:
        res = RecipeRunner(tiny_recipe({"method": "toy-scale", "scale": 3.0}), tmp_path / "run", log=lambda s: None,
                           progress=False).run()
        assert res["stages"][0]["scaled"] == 3.0 and res["stages"][0]["stage_dir"] == "00-toy-scale"
        from sparseforge.errors import ConfigError
        with pytest.raises(ConfigError, match="unknown"):
            tiny_recipe({"method": "toy-scale", "scale": 3.0, "nope": 1})
    finally:
        STAGES.unregister("toy-scale")
    from sparseforge.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown method 'toy-scale'"):
        tiny_recipe({"method": "toy-scale"})


def test_the_runner_branches_on_no_method_name():
    """recipe.py compares no string with a method name: what a stage does lives in its StageMethod."""
    tree = ast.parse((SRC / "recipe.py").read_text())
    names = set(STAGES.names())
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for c in [node.left, *node.comparators]:
                for sub in ast.walk(c):
                    if isinstance(sub, ast.Constant) and sub.value in names:
                        hits.append(f"line {node.lineno}: {sub.value!r}")
    assert not hits, hits
    runner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RecipeRunner")
    assert runner.end_lineno - runner.lineno < 200          # a loop over stages, not a hub that knows methods


def test_run_help_lists_every_registered_stage(capsys):
    from sparseforge.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert all(f"  {name} " in text for name in STAGES.names()), text


def test_run_record_reads_a_run_directory(tiny_recipe, tmp_path):
    """The one reader of a run's own record (benches commit it beside their models): recipe, start, per stage
    done/result/metrics, readable mid-run."""
    from sparseforge.recipe import run_record

    recipe = tiny_recipe({"method": "finetune", "epochs": 2}, {"method": "magnitude", "sparsity": 0.5})
    RecipeRunner(recipe, tmp_path / "run", log=lambda s: None, progress=False).run()
    rec = run_record(tmp_path / "run")
    assert rec["finished"] and "acc" in rec["start"] and rec["recipe_toml"] == recipe.to_toml()
    assert [s["dir"] for s in rec["stages"]] == ["00-finetune", "01-magnitude"] and all(s["done"] for s in rec["stages"])
    assert [m["epoch"] for m in rec["stages"][0]["metrics"]] == [1, 2]
    assert rec["stages"][1]["result"]["method"] == "magnitude"
    json.dumps(rec)
