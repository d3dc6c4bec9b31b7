"""``StageContext``: the public handle a stage gets - data and loaders (built once per run), evaluation, the
example input, teachers, the dense start model, the stage's directory and rank-aware writes."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..distributed import barrier, exists_on_main, is_main
from ..errors import ConfigError, RunDirError
from ..train import TrainConfig, Trainer, evaluate
from ..utils import atomic_write_json as _atomic_write_json
from ..utils import atomic_write_text as _atomic_write_text
from .base import Stage
from .. import rundir


def write_json(path: Path, obj: Any) -> None:
    """Rank 0 writes (under torchrun every rank runs the recipe); the others wait until the file is there."""
    if is_main():
        _atomic_write_json(path, obj)
    barrier()


def write_text(path: Path, text: str) -> None:
    """``write_json`` for text: rank 0 writes, every rank waits for the file."""
    if is_main():
        _atomic_write_text(path, text)
    barrier()


def save_model(model: nn.Module, path: Path) -> None:
    from ..models import save_weights

    if is_main():
        save_weights(model, path)
    barrier()


def load_stage_model(model: nn.Module, path: Path) -> nn.Module:
    """A finished stage's weights; structural stages changed the layer sizes, so rebuild from the saved spec."""
    from ..models import load_weights, model_from_spec, read_state_dict, spec_from_metadata

    spec = spec_from_metadata(read_state_dict(path)[1], path)
    if spec and (spec.get("arch") is not None or spec.get("reparameterized")):
        model = model_from_spec(spec)
    return load_weights(model, path)


@dataclasses.dataclass
class RunState:
    """What every stage of one run shares; built once by the runner before the first stage."""

    recipe: Any                     # Recipe (the recipe layer sits above this one)
    run_dir: Path
    log: Callable[[str], None]
    train_ds: Any
    test_ds: Any
    start_model: nn.Module
    progress: bool | None = None
    callbacks: tuple = ()           # added to every training stage (logging, tests)
    _loaders: dict = dataclasses.field(default_factory=dict)

    def train_config(self, overrides: dict[str, Any] | None = None) -> TrainConfig:
        return self.recipe.train_config(overrides)

    def loaders(self, cfg: TrainConfig | None = None):
        """(train, test) loaders for ``cfg`` (the recipe's settings by default), built once per distinct config."""
        from ..train.data import loaders_for

        cfg = cfg or self.train_config()
        key = repr(cfg)
        if key not in self._loaders:
            self._loaders[key] = loaders_for(cfg, self.train_ds, self.test_ds)
        return self._loaders[key]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.loaders()[1])

    def example(self) -> torch.Tensor:
        x, _ = next(iter(self.loaders()[1].iterate(0, 0)))
        return x[:1].float()


class StageContext:
    """Per stage: ``config`` (the stage's validated config), ``dir`` (its directory), ``index``; services shared
    by the run through ``state``."""

    def __init__(self, state: RunState, index: int, stage: Stage, directory: Path):
        self.state, self.index, self.stage, self.dir = state, index, stage, Path(directory)

    # ---- what the stage is --------------------------------------------------
    @property
    def config(self):
        return self.stage.config

    @property
    def recipe(self):
        return self.state.recipe

    @property
    def log(self) -> Callable[[str], None]:
        return self.state.log

    @property
    def start_model(self) -> nn.Module:
        """The dense model the run started from (never trained by a stage)."""
        return self.state.start_model

    @property
    def num_classes(self) -> int:
        return self.state.train_ds.num_classes

    def train_config(self, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """The recipe's training settings with this stage's ``[stage.train]`` overrides, then ``overrides``."""
        return self.state.train_config({**self.stage.train, **(overrides or {})})

    # ---- data and evaluation ----------------------------------------------
    def loaders(self, cfg: TrainConfig | None = None):
        return self.state.loaders(cfg)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.state.evaluate(model)

    def example(self) -> torch.Tensor:
        """One test image, (1, C, H, W): what tracing and MAC counting run on."""
        return self.state.example()

    def calibration(self, batches: int) -> list:
        """The first ``batches`` training batches (epoch 0's order, so a resumed run picks the same ones)."""
        out = []
        for x, y in self.loaders()[0].iterate(0, 0):
            if len(out) >= batches:
                break
            out.append((x, y))
        return out

    def gradients(self, model: nn.Module, batches: int = 8) -> None:
        """Accumulate gradients of the training loss over a few batches (Taylor importance reads them)."""
        model.zero_grad(set_to_none=True)
        model.train()
        for k, (x, y) in enumerate(self.loaders()[0].iterate(0, 0)):
            if k >= batches:
                break
            nn.functional.cross_entropy(model(x), y).backward()

    # ---- training -------------------------------------------------------------
    def train(self, model: nn.Module, epochs: int, callbacks=(), directory: Path | None = None) -> dict[str, Any]:
        """Train ``model`` for ``epochs`` with the stage's settings, resumable from ``directory`` (the stage's)."""
        sdir = Path(directory or self.dir)
        cfg = self.train_config({"epochs": epochs})
        tl, el = self.loaders(cfg)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        trainer = Trainer(model, cfg, tl, el, callbacks=[*callbacks, *self.state.callbacks], run_dir=sdir,
                          progress=self.state.progress, log=self.log)
        if exists_on_main(sdir / rundir.CONFIG):
            if TrainConfig.load(sdir / rundir.CONFIG) != cfg:
                raise RunDirError(f"{sdir} was trained with different settings; choose another --run-dir")
        else:
            write_text(sdir / rundir.CONFIG, cfg.to_toml())
        return trainer.fit(resume=True)

    # ---- teachers -------------------------------------------------------------
    def teacher(self, spec: str) -> nn.Module:
        """'start' (the dense start model), 'stage:N' (what earlier stage N produced) or a checkpoint path."""
        from ..models import load_weights, model_from_spec, read_state_dict, spec_from_metadata

        if spec == "start":
            return copy.deepcopy(self.start_model)
        if spec.startswith("stage:"):
            return self._stage_teacher(spec)
        path = Path(spec)
        if path.is_dir():
            path = path / rundir.MODEL
        meta = read_state_dict(path)[1]
        if not meta.get("model"):
            raise ConfigError(f"teacher {spec}: the file does not say which model it holds; use 'start' or a "
                              "sparseforge checkpoint")
        return load_weights(model_from_spec(spec_from_metadata(meta, path)), path)

    def _stage_teacher(self, spec: str) -> nn.Module:
        idx = spec.split(":", 1)[1]
        if not idx.isdigit():
            raise ConfigError(f"teacher {spec!r}: write stage:N with N the 0-based index of an earlier stage")
        n = int(idx)
        if n >= self.index:
            raise ConfigError(f"teacher {spec!r} in stage {self.index}: the teacher must be an earlier stage "
                              f"(0..{self.index - 1}); stages run in order")
        found = sorted((self.state.run_dir / rundir.STAGES).glob(f"{n:02d}-*/model.safetensors"))
        if not found:
            raise ConfigError(f"teacher {spec!r}: stage {n} left no model in {self.state.run_dir / 'stages'}")
        return load_stage_model(copy.deepcopy(self.start_model), found[0]).eval()

    # ---- files ----------------------------------------------------------------
    exists = staticmethod(exists_on_main)     # branch on this, never on path.exists(): see main_rank_says
    write_json = staticmethod(write_json)
    save_model = staticmethod(save_model)
    load_stage_model = staticmethod(load_stage_model)

    def read_json(self, path: Path) -> Any:
        return json.loads(Path(path).read_text())
