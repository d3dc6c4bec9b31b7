"""The stage contract: a recipe method is a registered ``StageMethod`` that owns its config type, says whether it
prunes (the runner then re-estimates BatchNorm statistics), and runs as ``run(ctx, model) -> (model, info)``.

Adding a method is one class with one decorator, next to nothing else::

    @register_stage("toy", ToyConfig)
    class Toy(StageMethod):
        def run(self, ctx, model):
            return model, {"note": ctx.config.note}

The recipe parser, the runner, ``sparseforge run --help`` and the registry-driven contract tests find it by name.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn as nn

from ..config import Config
from ..registry import Registry

if TYPE_CHECKING:
    from .context import StageContext


@dataclasses.dataclass(frozen=True)
class Stage:
    """One parsed ``[[stage]]`` of a recipe: the method name, its validated config, per-stage train overrides."""

    method: str
    config: Config
    train: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, **self.config.to_dict()}
        if self.train:
            d["train"] = dict(self.train)
        return d


class StageMethod:
    """Base class of recipe stages. ``name``/``config``/``prunes`` are set by ``register_stage``."""

    name: ClassVar[str] = ""
    config: ClassVar[type[Config]] = Config
    prunes: ClassVar[bool] = False        # weights no longer match their BatchNorm statistics afterwards
    main_rank_only: ClassVar[bool] = False   # under torchrun, only rank 0 runs it (timing); the others wait

    def run(self, ctx: "StageContext", model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        raise NotImplementedError


STAGES: Registry[type[StageMethod]] = Registry("recipe method")


def register_stage(name: str, config: type[Config], prunes: bool = False, main_rank_only: bool = False):
    """Class decorator: register a ``StageMethod`` subclass as recipe method ``name`` with config type ``config``."""

    def deco(cls: type[StageMethod]) -> type[StageMethod]:
        if not (isinstance(cls, type) and issubclass(cls, StageMethod)):
            raise TypeError(f"register_stage({name!r}) decorates a StageMethod subclass, got {cls!r}")
        cls.name, cls.config, cls.prunes, cls.main_rank_only = name, config, prunes, main_rank_only
        return STAGES.register(name, cls)

    return deco


def stage_configs() -> dict[str, type[Config]]:
    """Method name -> config type, for every registered stage."""
    return {name: cls.config for name, cls in STAGES.items()}
