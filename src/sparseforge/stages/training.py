"""Training stages: masked fine-tuning and the loss-changing methods (KD, R-Drop, Mixup family)."""

from __future__ import annotations

import dataclasses

from ..config import Config, opt
from ..distill import KDCallback, KDConfig
from ..regularize import MixCallback, MixConfig, RDropCallback, RDropConfig
from .base import StageMethod, register_stage


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(Config):
    """Train (masked, if the model has masks) for ``epochs`` with the recipe's training settings."""

    epochs: int = opt(3, "epochs of (masked) training", min=1)


@register_stage("finetune", FinetuneConfig)
class Finetune(StageMethod):
    def run(self, ctx, model):
        return model, {"train": ctx.train(model, ctx.config.epochs)}


@register_stage("kd", KDConfig)
class KnowledgeDistillation(StageMethod):
    def run(self, ctx, model):
        c = ctx.config
        cb = KDCallback(ctx.teacher(c.teacher), c)
        info = {"train": ctx.train(model, c.epochs, [cb])}
        if c.online:
            # the teacher trained alongside is a result too (with teacher = 'start': the dense control)
            info["online_teacher"] = cb.history
            info["teacher_acc"] = cb.history[-1].get("teacher_test_acc") if cb.history else None
            ctx.save_model(cb.teacher_model, ctx.dir / "teacher.safetensors")
        return model, info


@register_stage("rdrop", RDropConfig)
class RDrop(StageMethod):
    def run(self, ctx, model):
        return model, {"train": ctx.train(model, ctx.config.epochs, [RDropCallback(ctx.config)])}


@register_stage("mix", MixConfig)
class Mix(StageMethod):
    def run(self, ctx, model):
        cb = MixCallback(ctx.config, ctx.num_classes, seed=ctx.train_config().seed)
        return model, {"train": ctx.train(model, ctx.config.epochs, [cb])}
