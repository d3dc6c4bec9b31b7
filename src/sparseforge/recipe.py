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
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .config import Config, loads_toml, opt
from .errors import ConfigError, RunDirError
from .sparsity import ADMMCallback, ADMMConfig, METHOD_CONFIGS, prune
from .train import TrainConfig, Trainer, evaluate
from .distributed import barrier, broadcast_model, is_main
from .utils import atomic_write_json as _atomic_write_json
from .utils import atomic_write_text as _atomic_write_text
from .utils import set_threads


def atomic_write_json(path: Path, obj: Any) -> None:
    """Rank 0 writes (under torchrun every rank runs the recipe); the others wait until the file is there."""
    if is_main():
        _atomic_write_json(path, obj)
    barrier()


def atomic_write_text(path: Path, text: str) -> None:
    if is_main():
        _atomic_write_text(path, text)
    barrier()


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(Config):
    """Train (masked, if the model has masks) for ``epochs`` with the recipe's training settings."""

    epochs: int = opt(3, "epochs of (masked) training", min=1)


def _structured_stages() -> dict[str, type]:
    from .distill import KDConfig
    from .regularize import MixConfig, RDropConfig
    from .structured import EarlyBirdConfig, GroupLassoConfig
    from .tickets import IMPConfig

    from .lowbit import Pow2Config, ProgressivePrecisionConfig

    from .sparsity.gradual import GradualConfig

    return {"ssl": GroupLassoConfig, "earlybird": EarlyBirdConfig, "imp": IMPConfig, "kd": KDConfig,
            "gradual": GradualConfig,
            "rdrop": RDropConfig, "mix": MixConfig, "pow2": Pow2Config, "precision": ProgressivePrecisionConfig}


@dataclasses.dataclass(frozen=True)
class CompileConfig(Config):
    """Compile the current model with sparseforge.compile and measure it against the dense start model."""

    threads: int = opt(0, "engine and baseline threads (0 = the training threads / PyTorch default)", min=0)
    batches: tuple[int, ...] = opt((1,), "batch sizes measured", min=1)
    runs: int = opt(30, "timed runs per arm and batch size (median, p10, p90 reported)", min=5)
    onnxruntime: bool = opt(True, "also time onnxruntime on the dense ONNX, when installed")

    def validate(self) -> None:
        if not self.batches:
            raise ConfigError("CompileConfig.batches is empty: list the batch sizes to measure, e.g. batches = [1]")


@dataclasses.dataclass(frozen=True)
class RobustnessConfig(Config):
    """Localized Lipschitz estimate of the current model and of the dense start model, side by side."""

    eps: tuple[float, ...] = opt((0.01, 0.03, 0.1, 0.3, 1.0), "perturbation norms (L2, input space)")
    samples: int = opt(256, "test images", min=1)
    perturbations: int = opt(8, "random directions per image and eps", min=1)


STAGE_CONFIGS: dict[str, type] = {"finetune": FinetuneConfig, "admm": ADMMConfig, "compile": CompileConfig,
                                  "robustness": RobustnessConfig,
                                  **_structured_stages()}


def stage_configs() -> dict[str, type]:
    return {**METHOD_CONFIGS, **STAGE_CONFIGS}


@dataclasses.dataclass(frozen=True)
class Stage:
    method: str
    config: Config
    train: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, **self.config.to_dict()}
        if self.train:
            d["train"] = dict(self.train)
        return d


# stages after which the weights no longer match their BatchNorm statistics
PRUNING_STAGES = {"admm", "pattern", "magnitude", "structured", "depth", "ssl", "earlybird"}


RECIPE_OWNED = ("model", "dataset", "data_dir", "weights")   # TrainConfig fields only the recipe's top level sets


def parse_stage(d: dict[str, Any], where: str) -> Stage:
    if not isinstance(d, dict) or "method" not in d:
        raise ConfigError(f"{where}: every [[stage]] needs method = one of {', '.join(sorted(stage_configs()))}")
    d = dict(d)
    method = d.pop("method")
    cls = stage_configs().get(method)
    if cls is None:
        raise ConfigError(f"{where}: unknown method {method!r}; use one of {', '.join(sorted(stage_configs()))}")
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
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {p} not found; check the path (shipped recipes are in recipes/)")
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"recipe {p} is not a text (TOML) file; pass the .toml recipe") from None
        d = loads_toml(text, str(p))
        d.update(overrides or {})
        return cls.from_dict(d, where=str(p))


def _save_model(model: nn.Module, path: Path) -> None:
    from .models import save_weights

    if is_main():
        save_weights(model, path)
    barrier()


class RecipeRunner:
    """Runs a recipe's stages in order with stage-level and epoch-level resume."""

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

    # ---- setup -------------------------------------------------------------
    def prepare(self, resume: bool) -> None:
        cfg_path = self.run_dir / "recipe.toml"
        barrier()
        existed = cfg_path.exists()
        barrier()          # every rank has looked at the run directory before rank 0 writes into it
        if existed:
            saved = Recipe.from_toml(cfg_path.read_text(), str(cfg_path))
            if not resume:
                raise RunDirError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
            if saved.identity() != self.recipe.identity():
                raise RunDirError(f"{self.run_dir} was started with a different recipe; resume it with the same recipe "
                                  "or choose another --run-dir")
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_path, self.recipe.to_toml())

    def data(self):
        from .train.data import datasets_for

        cfg = self.recipe.train_config()
        train, test = datasets_for(cfg)
        if self.eval_limit:
            test = test.subset(self.eval_limit)
        self._train_ds, self._test_ds = train, test
        return train, test

    def loaders(self, cfg: TrainConfig):
        from .train.data import loaders_for

        return loaders_for(cfg, self._train_ds, self._test_ds)

    def build_model(self) -> nn.Module:
        from .models import create_model, load_weights

        torch.manual_seed(self.recipe.train_config().seed)
        model = create_model(self.recipe.model, num_classes=self._train_ds.num_classes)
        if self.recipe.weights:
            load_weights(model, self.recipe.weights)
        return model

    # ---- stages --------------------------------------------------------------
    def _train(self, model: nn.Module, cfg: TrainConfig, sdir: Path, callbacks=()) -> dict[str, Any]:
        tl, el = self.loaders(cfg)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        trainer = Trainer(model, cfg, tl, el, callbacks=[*callbacks, *self.extra_callbacks], run_dir=sdir, progress=self.progress, log=self.log)
        if (sdir / "config.toml").exists():
            saved = TrainConfig.load(sdir / "config.toml")
            if saved != cfg:
                raise RunDirError(f"{sdir} was trained with different settings; choose another --run-dir")
        else:
            cfg.save(sdir / "config.toml")
        return trainer.fit(resume=True)

    def run_stage(self, model: nn.Module, stage: Stage, sdir: Path) -> tuple[nn.Module, dict[str, Any]]:
        model, info = self._run_stage(model, stage, sdir)
        if stage.method in PRUNING_STAGES and self.recipe.bn_recalibration:
            info["bn_recalibrated_batches"] = self._recalibrate_bn(model, self.recipe.bn_recalibration)
        return model, info

    def _recalibrate_bn(self, model: nn.Module, batches: int) -> int:
        """Cumulative BN statistics over ``batches`` training batches (no weight changes)."""
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not bns:
            return 0
        tl, _ = self.loaders(self.recipe.train_config())
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

    def _run_stage(self, model: nn.Module, stage: Stage, sdir: Path) -> tuple[nn.Module, dict[str, Any]]:
        info: dict[str, Any] = {}
        if stage.method == "finetune":
            cfg = self.recipe.train_config({**stage.train, "epochs": stage.config.epochs})
            info["train"] = self._train(model, cfg, sdir)
        elif stage.method == "admm":
            cfg = self.recipe.train_config({**stage.train, "epochs": stage.config.epochs})
            cb = ADMMCallback(stage.config)
            info["train"] = self._train(model, cfg, sdir, callbacks=[cb])
            info["admm"] = cb.residuals
            prune(model, stage.config.target)
        elif stage.method == "gradual":
            from .distill import KDCallback, KDConfig
            from .sparsity.gradual import GradualCallback

            c = stage.config
            cfg = self.recipe.train_config({**stage.train, "epochs": c.epochs})
            cb = GradualCallback(c)
            cbs = [cb]
            if c.teacher:
                cbs.append(KDCallback(self._teacher(c.teacher), KDConfig(epochs=c.epochs, teacher=c.teacher, T=c.T,
                                                                         alpha=c.alpha)))
            info["train"] = self._train(model, cfg, sdir, callbacks=cbs)
            info["gradual"] = cb.history
        elif stage.method == "ssl":
            from .structured import GroupLassoCallback, ssl_remove

            cfg = self.recipe.train_config({**stage.train, "epochs": stage.config.epochs})
            cb = GroupLassoCallback(stage.config)
            info["train"] = self._train(model, cfg, sdir, callbacks=[cb])
            info["group_norms"] = cb.history
            model = ssl_remove(model, stage.config, self._example())
        elif stage.method == "earlybird":
            from .structured import EarlyBirdCallback, StructuredConfig

            cfg = self.recipe.train_config({**stage.train, "epochs": stage.config.epochs})
            cb = EarlyBirdCallback(stage.config)
            info["train"] = self._train(model, cfg, sdir, callbacks=[cb])
            info["earlybird"] = {"drawn_epoch": cb.drawn_epoch, "distances": cb.distances}
            model = prune(model, StructuredConfig(importance="bn", ratio=stage.config.ratio, normalize=False),
                          example_input=self._example())
        elif stage.method == "imp":
            model, extra = self._imp(model, stage, sdir)
            info.update(extra)
        elif stage.method in ("pow2", "precision"):
            from .lowbit import (ProgressivePrecisionCallback, apply_fake_quant, apply_pow2, fold_lowbit,
                                 pow2_storage)
            from .structured import count_macs

            cfg = self.recipe.train_config({**stage.train, "epochs": stage.config.epochs})
            cbs = []
            if stage.method == "pow2":
                apply_pow2(model, stage.config)
                info["storage_bits_before"] = pow2_storage(model)
            else:
                macs = count_macs(model, self._example())
                apply_fake_quant(model)
                cbs.append(ProgressivePrecisionCallback(stage.config, macs))
            info["train"] = self._train(model, cfg, sdir, callbacks=cbs)
            if stage.method == "pow2":
                info["storage_bits"] = pow2_storage(model)
            else:
                cb = cbs[0]
                info["precision"] = {"final_stage": cb.stage, "switch_steps": cb.switches,
                                     "bitops": cb.bitops, "bitops_fixed_8bit": cb.bitops_8bit, "saved": cb.saved()}
            fold_lowbit(model)
        elif stage.method == "robustness":
            from .report import lipschitz

            c = stage.config
            _, el = self.loaders(self.recipe.train_config())
            kw = dict(eps_values=c.eps, perturbations=c.perturbations, max_samples=c.samples)
            info["lipschitz"] = {
                "dense start": {str(k): v for k, v in lipschitz(self._start_model, el.iterate(0, 0), **kw).items()},
                "compressed": {str(k): v for k, v in lipschitz(model, el.iterate(0, 0), **kw).items()}}
        elif stage.method == "compile":
            if is_main():     # timing on one rank only: the others would compete for the same cores
                info.update(self._compile(model, stage.config, sdir))
            barrier()
        elif stage.method in ("kd", "rdrop", "mix"):
            cfg = self.recipe.train_config({**stage.train, "epochs": stage.config.epochs})
            cb = self._loss_callback(stage)
            info["train"] = self._train(model, cfg, sdir, callbacks=[cb])
            if stage.method == "kd" and stage.config.online:
                # the teacher trained alongside is a result too (with teacher = 'start': the dense control)
                info["online_teacher"] = cb.history
                info["teacher_acc"] = cb.history[-1].get("teacher_test_acc") if cb.history else None
                _save_model(cb.teacher_model, sdir / "teacher.safetensors")
        else:
            if getattr(stage.config, "importance", None) == "taylor":
                self._gradients(model)
            if stage.method == "depth" and (stage.config.regularize_epochs or stage.config.inplace_epochs):
                model, info = self._depth_trained(model, stage, sdir)
            elif getattr(stage.config, "regularize_epochs", 0):
                from .structured import growing_reg, remove_channels

                cb, dg, rem = growing_reg(model, stage.config, self._example())
                cfg = self.recipe.train_config({**stage.train, "epochs": stage.config.regularize_epochs})
                info["train"] = self._train(model, cfg, sdir, callbacks=[cb])
                info["growing_reg"] = cb.history
                model = remove_channels(model, dg, rem)
            elif stage.method == "depth":
                model = prune(model, stage.config, example_input=self._example(),
                              calibration=self._calibration(stage.config.calibration_batches))
                info["depth"] = getattr(model, "sf_depth_history", [])
            else:
                model = prune(model, stage.config, example_input=self._example())
        return model, info

    def _depth_trained(self, model: nn.Module, stage: Stage, sdir: Path) -> tuple[nn.Module, dict[str, Any]]:
        """Choose the blocks, train with them (fade their branches out for ``regularize_epochs`` epochs, or train the
        shallow sub-network in place for ``inplace_epochs``), then drop them. The choice is written to
        ``depth_plan.json`` first, so a resumed stage trains with the same blocks."""
        from .structured import InplaceDepthCallback, drop_blocks, growing_depth, plan_depth

        c = stage.config
        plan_file = sdir / "depth_plan.json"
        if plan_file.exists():
            plan = json.loads(plan_file.read_text())
        else:
            plan = plan_depth(model, c, self._example(), self._calibration(c.calibration_batches))
            sdir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(plan_file, plan)
        blocks = [h["block"] for h in plan]
        info: dict[str, Any] = {"depth": plan}
        if c.inplace_epochs:
            self.log(f"depth: training the net without {len(blocks)} residual branches inside the full net for "
                     f"{c.inplace_epochs} epoch(s): {', '.join(blocks)}")
            cb = InplaceDepthCallback(blocks, T=c.inplace_T, alpha=c.inplace_alpha, warmup_epochs=c.inplace_warmup)
            cfg = self.recipe.train_config({**stage.train, "epochs": c.inplace_epochs})
            info["train"] = self._train(model, cfg, sdir, callbacks=[cb])
            info["inplace"] = cb.history
            info["full_acc_before_drop"] = info["train"].get("test_acc")    # the deep net (the teacher) at the end
            info["acc_before_drop"] = cb.history[-1].get("sub_test_acc") if cb.history else None
        else:
            self.log(f"depth: fading {len(blocks)} residual branches for {c.regularize_epochs} epoch(s): "
                     f"{', '.join(blocks)}")
            cb = growing_depth(model, blocks, c.reg_max)
            cfg = self.recipe.train_config({**stage.train, "epochs": c.regularize_epochs})
            info["train"] = self._train(model, cfg, sdir, callbacks=[cb])
            info["growing_reg"] = cb.history
            info["acc_before_drop"] = info["train"].get("test_acc")     # the last epoch's evaluation, branches faded
        model = drop_blocks(model, blocks, plan)
        return model, info

    def _calibration(self, batches: int) -> list:
        """The first ``batches`` training batches (epoch 0's order, so a resumed run picks the same ones)."""
        tl, _ = self.loaders(self.recipe.train_config())
        out = []
        for x, y in tl.iterate(0, 0):
            if len(out) >= batches:
                break
            out.append((x, y))
        return out

    def _compile(self, model: nn.Module, c: CompileConfig, sdir: Path) -> dict[str, Any]:
        """Engine vs PyTorch dense (BN folded) vs onnxruntime dense vs PyTorch on the compressed model."""
        from .engine import compile as sf_compile
        from .report.latency import measure, onnxruntime_session, torch_fused

        threads = c.threads or self.recipe.train_config().threads or torch.get_num_threads()
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model.eval()
            x1 = self._example()
            engine = sf_compile(model, x1, threads=threads)
            dense = torch_fused(self._start_model)
            mine = torch_fused(model)
            sess = onnxruntime_session(self._start_model, x1, threads) if c.onnxruntime else None
            out: dict[str, Any] = {"threads": threads, "latency": {}}
            for b in c.batches:
                x = x1.repeat(b, 1, 1, 1)
                with torch.inference_mode():
                    ref = model(x)
                    out.setdefault("max_rel_err", {})[str(b)] = float((engine(x) - ref).abs().max() / ref.abs().max())
                fns = {"sparseforge": lambda x=x: engine(x), "torch-dense": lambda x=x: dense(x),
                       "torch-compressed": lambda x=x: mine(x)}
                if sess is not None:
                    xn = x.numpy()
                    fns["onnxruntime-dense"] = lambda xn=xn: sess.run(None, {"input": xn})
                out["latency"][str(b)] = measure(fns, runs=c.runs)
            prof = engine.profile(batch=1, reps=20, mode="network")
            out["engine_ops"] = [{"name": op["name"], "path": "generated" if op["native"] else "PyTorch",
                                  "describe": op["describe"], "us": 1e6 * prof.get(k, 0.0)}
                                 for k, op in enumerate(engine.spec["ops"])]
            if (sdir / "engine").exists():
                # left by an earlier attempt at this stage that was killed before the stage was marked done (a
                # done stage is never rerun): this attempt's engine replaces it, so results.json names it
                shutil.rmtree(sdir / "engine")
            try:
                engine.save(sdir / "engine")
                out["engine_dir"] = str(sdir / "engine")
            except Exception as e:  # noqa: BLE001 - engines with PyTorch fallbacks cannot be saved yet
                out["engine_dir"] = None
                out["engine_save_error"] = str(e)
            return out
        finally:
            torch.set_num_threads(prev)

    def _loss_callback(self, stage: Stage):
        from .distill import KDCallback
        from .regularize import MixCallback, RDropCallback

        if stage.method == "kd":
            return KDCallback(self._teacher(stage.config.teacher), stage.config)
        if stage.method == "rdrop":
            return RDropCallback(stage.config)
        return MixCallback(stage.config, self._train_ds.num_classes, seed=self.recipe.train_config().seed)

    def _teacher(self, spec: str) -> nn.Module:
        import copy

        from .models import load_weights, model_from_spec, read_state_dict

        if spec == "start":
            return copy.deepcopy(self._start_model)
        if spec.startswith("stage:"):
            return self._stage_teacher(spec)
        path = Path(spec)
        if path.is_dir():
            path = path / "model.safetensors"
        meta = read_state_dict(path)[1]
        if not meta.get("model"):
            raise ConfigError(f"teacher {spec}: the file does not say which model it holds; use 'start' or a "
                              "sparseforge checkpoint")
        from .models import spec_from_metadata

        return load_weights(model_from_spec(spec_from_metadata(meta, path)), path)

    def _stage_teacher(self, spec: str) -> nn.Module:
        """The model an earlier stage of this run produced (e.g. the dense model right before pruning), so a
        pruned network can learn from its own unpruned self without a second training run."""
        idx = spec.split(":", 1)[1]
        if not idx.isdigit():
            raise ConfigError(f"teacher {spec!r}: write stage:N with N the 0-based index of an earlier stage")
        n = int(idx)
        cur = self._stage_index
        if n >= cur:
            raise ConfigError(f"teacher {spec!r} in stage {cur}: the teacher must be an earlier stage "
                              f"(0..{cur - 1}); stages run in order")
        found = sorted((self.run_dir / "stages").glob(f"{n:02d}-*/model.safetensors"))
        if not found:
            raise ConfigError(f"teacher {spec!r}: stage {n} left no model in {self.run_dir / 'stages'}")
        import copy

        return self._load_stage_model(copy.deepcopy(self._start_model), found[0]).eval()

    def _imp(self, model: nn.Module, stage: Stage, sdir: Path) -> tuple[nn.Module, dict[str, Any]]:
        """Rounds live in sdir/round-N (each resumable); the rewind target and start weights are files."""
        import copy

        from .distill import KDCallback, KDConfig
        from .tickets import SnapshotCallback, imp_prune, load_state, rewind_step, rewind_weights, save_state

        c = stage.config
        cfg = self.recipe.train_config({**stage.train, "epochs": c.epochs})
        spe = self.loaders(cfg)[0].num_batches()
        spe = min(spe, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else spe
        rs = rewind_step(c.rewind, spe)
        start_f, snap_f = sdir / "start.safetensors", sdir / "rewind.safetensors"
        if not start_f.exists():
            if is_main():
                save_state({k: v.detach().clone() for k, v in model.state_dict().items()}, start_f)
            barrier()
        start = load_state(start_f)
        teacher = None
        if c.kd:
            teacher = copy.deepcopy(model)
            teacher.load_state_dict({k: v for k, v in start.items() if not k.endswith("weight_mask")}, strict=False)
        rounds = []
        for r in range(c.rounds + 1):             # the last "round" is the final retraining, without pruning
            rdir = sdir / (f"round-{r}" if r < c.rounds else "final")
            rdir.mkdir(parents=True, exist_ok=True)
            if (rdir / "done.json").exists():
                model = self._load_stage_model(model, rdir / "model.safetensors")
                rounds.append(json.loads((rdir / "done.json").read_text()))
                continue
            cbs = []
            snap = None
            if r == 0 and rs is not None and rs >= 0 and not snap_f.exists():
                snap = SnapshotCallback(rs, snap_f)
                cbs.append(snap)
            if teacher is not None:
                cbs.append(KDCallback(teacher, KDConfig(T=c.kd_T, alpha=c.kd_alpha)))
            tr = self._train(model, cfg, rdir, callbacks=cbs)
            rec: dict[str, Any] = {"round": r, "train": tr}
            if r < c.rounds:
                if rs is not None and rs >= 0 and not snap_f.exists():
                    raise ConfigError(f"IMP rewind point {c.rewind} (step {rs}) lies beyond round 0's "
                                      f"{cfg.epochs * spe} steps; rewind earlier or train longer")
                counts = imp_prune(model, c)
                if rs == -1:
                    rewind_weights(model, start)
                elif rs is not None:
                    rewind_weights(model, load_state(snap_f))
                rec["kept"] = sum(counts.values())
                rec["eval_after_rewind"] = self.evaluate(model)
            _save_model(model, rdir / "model.safetensors")
            atomic_write_json(rdir / "done.json", rec)
            rounds.append(rec)
        return model, {"imp_rounds": rounds}

    def _example(self) -> torch.Tensor:
        x, _ = next(iter(self.loaders(self.recipe.train_config())[1].iterate(0, 0)))
        return x[:1].float()

    def _gradients(self, model: nn.Module, batches: int = 8) -> None:
        """Taylor importance: accumulate gradients of the training loss over a few batches."""
        tl, _ = self.loaders(self.recipe.train_config())
        model.zero_grad(set_to_none=True)
        model.train()
        for k, (x, y) in enumerate(tl.iterate(0, 0)):
            if k >= batches:
                break
            nn.functional.cross_entropy(model(x), y).backward()

    def _load_stage_model(self, model: nn.Module, path: Path) -> nn.Module:
        """A finished stage's weights; structural stages changed the layer sizes, so rebuild from the saved spec."""
        from .models import load_weights, model_from_spec, read_state_dict

        meta = read_state_dict(path)[1]
        from .models import spec_from_metadata

        spec = spec_from_metadata(meta, path)
        if spec and spec.get("arch") is not None:
            model = model_from_spec(spec)
        return load_weights(model, path)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        cfg = self.recipe.train_config()
        _, el = self.loaders(cfg)
        return evaluate(model, el)

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
        t0 = time.perf_counter()
        self.prepare(resume)
        if is_main():
            self.log(f"run directory: {self.run_dir}")
        set_threads(self.recipe.train_config().threads)
        self.data()
        model = self.build_model()
        import copy

        from .structured import arch_of

        self._start_model = copy.deepcopy(model)    # the teacher for kd stages with teacher = "start"

        self.results["arch_start"] = arch_of(model)
        start_file = self.run_dir / "start.json"
        if start_file.exists():
            start = json.loads(start_file.read_text())
        else:
            start = self.evaluate(model)
            atomic_write_json(start_file, start)
        self.results["start"] = start
        self.log(f"start: {self.recipe.model} test acc {start['acc']:.2f}%")
        stages = self.recipe.stages()
        for i, stage in enumerate(stages):
            self._stage_index = i
            sdir = self.run_dir / "stages" / f"{i:02d}-{stage.method}"
            done = sdir / "done.json"
            if done.exists():
                model = self._load_stage_model(model, sdir / "model.safetensors")
                info = json.loads(done.read_text())
                self.log(f"stage {i} ({stage.method}): already done, loaded (test acc {info['eval']['acc']:.2f}%)")
            else:
                self.log(f"stage {i} ({stage.method}): running")
                sdir.mkdir(parents=True, exist_ok=True)
                ts = time.perf_counter()
                model, info = self.run_stage(model, stage, sdir)
                broadcast_model(model)     # rank 0's masks / library / pruned weights everywhere
                info["eval"] = self.evaluate(model)
                info["seconds"] = round(time.perf_counter() - ts, 1)
                info["method"] = stage.method
                info["config"] = stage.to_dict()
                _save_model(model, sdir / "model.safetensors")
                atomic_write_json(done, info)
                self.log(f"stage {i} ({stage.method}): test acc {info['eval']['acc']:.2f}% ({info['seconds']:.0f} s)")
            self.results["stages"].append(info)
        _save_model(model, self.run_dir / "model.safetensors")
        self.model = model
        self.results["final"] = self.results["stages"][-1]["eval"] if stages else start
        self.results["seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
        from .report.run_report import write_run_report

        if is_main():
            self.results = write_run_report(self.run_dir, model, self.recipe, self.results)
        barrier()
        return self.results
