"""Recipes: one TOML file describes model, data and an ordered list of stages.

    model = "resnet20"
    weights = "../shared/models/resnet20-cifar10jpeg.safetensors"
    dataset = "cifar10"
    [train]                      # TrainConfig fields shared by every training stage
    lr = 0.02
    [[stage]]
    method = "admm"              # ADMMConfig fields; trains, then hard-prunes to its target
    epochs = 3
    [stage.target]
    connectivity = "3.6x"
    [[stage]]
    method = "finetune"          # masked retraining
    epochs = 3
    [stage.train]                # per-stage TrainConfig overrides
    lr = 0.01

Running a recipe writes one run directory; each stage gets ``stages/NN-method/``
with its own checkpoints and, when finished, ``model.safetensors`` +
``done.json``. Re-running resumes: finished stages are loaded, not redone, and
an interrupted training stage continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .config import Config, content_hash, loads_toml, opt
from .distributed import barrier, broadcast_model, exists_on_main, is_main
from .errors import ConfigError, RunDirError, SparseforgeError
from .stages import (STAGES, CompileConfig, FinetuneConfig, RobustnessConfig, RunState, Stage, StageContext,
                     load_stage_model, save_model, stage_configs, write_json, write_text)
from .train import TrainConfig
from .utils import set_threads
from . import rundir

__all__ = ["Recipe", "RecipeRunner", "run_record", "Stage", "parse_stage", "stage_configs", "FinetuneConfig", "CompileConfig",
           "RobustnessConfig"]



RECIPE_OWNED = ("model", "dataset", "data_dir", "weights")   # TrainConfig fields only the recipe's top level sets


def parse_stage(d: dict[str, Any], where: str) -> Stage:
    names = ", ".join(STAGES.names())
    if not isinstance(d, dict) or "method" not in d:
        raise ConfigError(f"{where}: every [[stage]] needs method = one of {names}")
    d = dict(d)
    method = d.pop("method")
    if not isinstance(method, str) or method not in STAGES:
        raise ConfigError(f"{where}: unknown method {method!r}; use one of {names}")
    cls = STAGES.get(method).config
    train = d.pop("train", {}) or {}
    if not isinstance(train, dict):
        raise ConfigError(f"{where}.train: expected a table of TrainConfig fields, e.g. [stage.train] lr = 0.01")
    owned = sorted(set(train) & set(RECIPE_OWNED + ("epochs",)))
    if owned:
        raise ConfigError(f"{where}.train sets {', '.join(owned)}, which a stage's train table cannot change (the "
                          "recipe's top level sets model, dataset, data_dir and weights; a stage sets its own epochs)")
    TrainConfig.from_dict({**train}, where=f"{where}.train") if train else None
    return Stage(method, cls.from_dict(d, where=f"{where} ({method})"), dict(train))


@dataclasses.dataclass(frozen=True)
class Recipe(Config):
    model: str = opt("resnet20", "model name")
    model_args: dict[str, Any] = opt(help="the model's options, e.g. {width = 1.5} for repghostnet; saved in every "
                                          "checkpoint's metadata like the name", factory=dict)
    weights: str = opt("", "start weights (empty = random init)")
    dataset: str = opt("synthetic", "synthetic | cifar10 | cifar100")
    data_dir: str = opt("", "dataset directory")
    train: dict[str, Any] = opt(help="TrainConfig fields shared by training stages", factory=dict)
    stage: tuple[dict[str, Any], ...] = opt((), "ordered stages")
    bn_recalibration: int = opt(50, "after every pruning step, re-estimate BatchNorm statistics on this many "
                                    "training batches (stale statistics make a freshly pruned net look broken); "
                                    "0 = off", min=0)

    def validate(self) -> None:
        if not self.stage:
            raise ConfigError("Recipe.stage: a recipe needs at least one [[stage]]")
        owned = sorted(set(self.train) & {"model", "weights"})
        if owned:
            raise ConfigError(f"Recipe.train sets {', '.join(owned)}, which the run never reads there: set them at "
                              "the recipe's top level (model = ..., weights = ...)")
        if self.model_args:
            from .models import create_model

            try:
                create_model(self.model, **self.model_args)
            except SparseforgeError as e:
                raise ConfigError(f"Recipe.model_args: {e}; see the model's options in `sparseforge info`") from None
        for i, s in enumerate(self.stage):
            st = parse_stage(s, f"stage[{i}]")
            t = str(getattr(st.config, "teacher", ""))
            if t.startswith("stage:") and not (t[6:].isdigit() and int(t[6:]) < i):
                raise ConfigError(f"stage[{i}].teacher = {t!r}: write stage:N with N the index (from 0) of an "
                                  f"earlier stage, 0..{i - 1}")
        # data_dir may come from the command line at run time; everything else must be valid now
        self.train_config({"data_dir": self.data_dir or "(given at run time)"})

    def stages(self) -> list[Stage]:
        return [parse_stage(s, f"stage[{i}]") for i, s in enumerate(self.stage)]

    def identity(self) -> "Recipe":
        """The recipe without ``train.device``: where a run trains is not what it computes, so a run started on a
        GPU resumes on the CPU (and keeps its default run directory name)."""
        import dataclasses

        return dataclasses.replace(self, train={k: v for k, v in self.train.items() if k != "device"})

    def train_config(self, overrides: dict[str, Any] | None = None) -> TrainConfig:
        base = {"model": self.model, "dataset": self.dataset, "data_dir": self.data_dir}
        return TrainConfig.from_dict({**base, **self.train, **(overrides or {})}, where="Recipe.train")

    @classmethod
    def load_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "Recipe":
        """Read a TOML recipe; ``overrides`` (nested, as ``--set`` gives them; ``{"stage": {"0": {"epochs": 1}}}``
        sets a field of one stage) are merged in. A relative ``weights`` path that does not exist from the working
        directory is looked up beside the recipe and in the folder above it (the project root for recipes/)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {p} not found; check the path (shipped recipes are in recipes/)")
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"recipe {p} is not a text (TOML) file; pass the .toml recipe") from None
        except OSError as e:
            raise ConfigError(f"cannot read recipe {p} ({e.strerror}); check the path and its permissions") from None
        d = apply_overrides(loads_toml(text, str(p)), overrides or {})
        if d.get("weights") and not Path(d["weights"]).exists():
            for base in (p.parent, p.parent.parent):
                if (base / d["weights"]).exists():
                    d["weights"] = str((base / d["weights"]).resolve())
                    break
        return cls.from_dict(d, where=str(p))

    def run_name(self, stem: str) -> str:
        """``stem-<hash>``: the default run directory name, from what the run computes (not where it trains)."""
        return f"{stem}-{content_hash(self.identity().to_dict())}"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(d: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a recipe dict; ``stage`` overrides are keyed by stage index."""
    over = dict(overrides)
    if "stage" in over:
        st = [dict(s) for s in d.get("stage", [])]
        per = over.pop("stage")
        if not isinstance(per, dict) or not all(isinstance(o, dict) for o in per.values()):
            raise ConfigError("--set stage...: set one field of one stage, e.g. --set stage.0.epochs=1")
        for idx, o in per.items():
            if not str(idx).isdigit() or int(idx) >= len(st):
                raise ConfigError(f"--set stage.{idx}...: the recipe has stages 0..{len(st) - 1}")
            st[int(idx)] = _merge(st[int(idx)], o)
        d = {**d, "stage": st}
    return _merge(d, over)


def run_record(run_dir: str | Path) -> dict[str, Any]:
    """What a run directory says about itself, small enough to commit beside a model: the recipe, the start
    evaluation, and per stage whether it finished, its result (``done.json``) and its per-epoch metrics; readable
    while the run is still going."""
    d = Path(run_dir)
    rec: dict[str, Any] = {"recipe_toml": (d / rundir.RECIPE).read_text(), rundir.STAGES: []}
    if (d / rundir.START).exists():
        rec["start"] = json.loads((d / rundir.START).read_text())
    for sdir in sorted((d / rundir.STAGES).glob("*")):
        st: dict[str, Any] = {"dir": sdir.name, "done": (sdir / rundir.DONE).exists()}
        if st["done"]:
            st["result"] = json.loads((sdir / rundir.DONE).read_text())
        st["metrics"] = [json.loads(line) for m in sorted(sdir.rglob(rundir.METRICS))
                         for line in m.read_text().splitlines() if line.strip()]
        rec["stages"].append(st)
    rec["finished"] = (d / rundir.MODEL).exists()
    return rec


class RecipeRunner:
    """Runs a recipe's stages in order with stage-level and epoch-level resume.

    The runner knows no method: it builds the run's shared state (data, start model), then for each stage looks
    up its registered ``StageMethod``, runs it with a ``StageContext``, re-estimates BatchNorm statistics after
    a stage that prunes, evaluates, and saves the model and ``done.json``.
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path, log: Callable[[str], None] | None = None,
                 progress: bool | None = None, eval_limit: int = 0, callbacks: tuple = ()):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.log = log or (lambda s: print(s, file=sys.stderr))
        if not is_main():             # under torchrun only rank 0 talks
            self.log = lambda s: None
        self.progress = progress
        self.eval_limit = eval_limit
        self.extra_callbacks = tuple(callbacks)  # added to every training stage (logging, tests)
        self.results: dict[str, Any] = {"stages": []}
        self.state: RunState | None = None      # built by run(): data, loaders, the dense start model
        self.model: nn.Module | None = None     # the final model, after run()

    def prepare(self, resume: bool) -> None:
        cfg_path = self.run_dir / rundir.RECIPE
        existed = exists_on_main(cfg_path)    # rank 0 looks once, before it writes (see main_rank_says)
        if existed:
            saved = Recipe.from_toml(cfg_path.read_text(), str(cfg_path))
            if not resume:
                raise RunDirError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
            if saved.identity() != self.recipe.identity():
                raise RunDirError(f"{self.run_dir} was started with a different recipe; resume it with the same recipe "
                                  "or choose another --run-dir")
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(cfg_path, self.recipe.to_toml())

    def _state(self) -> RunState:
        """Data (test set cut to eval_limit), the start model (recipe weights) and its copy kept as the teacher."""
        from .models import create_model, load_weights
        from .train.data import datasets_for

        cfg = self.recipe.train_config()
        train, test = datasets_for(cfg)
        if self.eval_limit:
            test = test.subset(self.eval_limit)
        torch.manual_seed(cfg.seed)
        model = create_model(self.recipe.model, num_classes=train.num_classes, **self.recipe.model_args)
        if self.recipe.weights:
            load_weights(model, self.recipe.weights)
        return RunState(self.recipe, self.run_dir, self.log, train, test, model, self.progress, self.extra_callbacks)

    def context(self, index: int) -> StageContext:
        """The context stage ``index`` runs with (after run(): e.g. to load a stage's teacher the way it did)."""
        stage = self.recipe.stages()[index]
        return StageContext(self.state, index, stage, rundir.stage_dir(self.run_dir, index, stage.method))

    def recalibrate_bn(self, model: nn.Module, batches: int) -> int:
        """Cumulative BN statistics over ``batches`` training batches (no weight changes)."""
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not bns:
            return 0
        tl, _ = self.state.loaders()
        saved = [(m.momentum, m.training) for m in bns]
        was = model.training
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None          # cumulative moving average
            m.train()
        n = 0
        with torch.no_grad():
            for x, _ in tl.iterate(0, 0):
                if n >= batches:
                    break
                model(x)
                n += 1
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
            m.train(tr)
        model.train(was)
        return n

    def run_stage(self, model: nn.Module, index: int) -> tuple[nn.Module, dict[str, Any]]:
        ctx = self.context(index)
        method = STAGES.get(ctx.stage.method)()
        info: dict[str, Any] = {}
        if method.main_rank_only:     # timing on one rank only: the others would compete for the same cores
            if is_main():
                model, info = method.run(ctx, model)
            barrier()
        else:
            model, info = method.run(ctx, model)
        if method.prunes and self.recipe.bn_recalibration:
            info["bn_recalibrated_batches"] = self.recalibrate_bn(model, self.recipe.bn_recalibration)
        return model, info

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.state.evaluate(model)

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) every stage; the run directory is locked against a second process meanwhile."""
        from .utils import RunLock, resolve_device

        resolve_device(self.recipe.train_config().device)   # before the run directory exists: a retry is not blocked
        lock = RunLock(self.run_dir)
        if is_main():
            lock.acquire()
        try:
            return self._run(resume)
        finally:
            lock.release()

    def _run(self, resume: bool) -> dict[str, Any]:
        import copy

        from .report.run_report import write_run_report
        from .structured import arch_of

        t0 = time.perf_counter()
        self.prepare(resume)
        if is_main():
            self.log(f"run directory: {self.run_dir}")
        set_threads(self.recipe.train_config().threads)
        self.state = self._state()
        model = copy.deepcopy(self.state.start_model)
        self.results["arch_start"] = arch_of(model)
        start_file = self.run_dir / rundir.START
        if exists_on_main(start_file):
            start = json.loads(start_file.read_text())
        else:
            start = self.evaluate(model)
            write_json(start_file, start)
        self.results["start"] = start
        self.log(f"start: {self.recipe.model} test acc {start['acc']:.2f}%")
        stages = self.recipe.stages()
        for i, stage in enumerate(stages):
            sdir = rundir.stage_dir(self.run_dir, i, stage.method)
            done = sdir / rundir.DONE
            if exists_on_main(done):
                model = load_stage_model(model, sdir / rundir.MODEL)
                info = json.loads(done.read_text())
                self.log(f"stage {i} ({stage.method}): already done, loaded (test acc {info['eval']['acc']:.2f}%)")
            else:
                self.log(f"stage {i} ({stage.method}): running")
                sdir.mkdir(parents=True, exist_ok=True)
                ts = time.perf_counter()
                model, info = self.run_stage(model, i)
                broadcast_model(model)     # rank 0's masks / library / pruned weights everywhere
                info["eval"] = self.evaluate(model)
                info["seconds"] = round(time.perf_counter() - ts, 1)
                info["method"] = stage.method
                info["config"] = stage.to_dict()
                save_model(model, sdir / rundir.MODEL)
                write_json(done, info)
                self.log(f"stage {i} ({stage.method}): test acc {info['eval']['acc']:.2f}% ({info['seconds']:.0f} s)")
            self.results["stages"].append(info)
        save_model(model, self.run_dir / rundir.MODEL)
        self.model = model
        self.results["final"] = self.results["stages"][-1]["eval"] if stages else start
        self.results["seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
        if is_main():
            self.results = write_run_report(self.run_dir, model, self.recipe, self.results)
        barrier()
        return self.results
