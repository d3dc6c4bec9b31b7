"""Unstructured and pattern sparsity stages: one-shot pruning, ADMM, gradual pruning."""

from __future__ import annotations

from ..distill import KDCallback, KDConfig
from ..sparsity import ADMMCallback, ADMMConfig, MagnitudeConfig, PatternConfig, prune
from ..sparsity.gradual import GradualCallback, GradualConfig
from .base import StageMethod, register_stage


class OneShotPrune(StageMethod):
    """``prune(model, config)``: masks attached (or, for structural methods, a smaller model returned)."""

    def run(self, ctx, model):
        return prune(model, ctx.config, example_input=ctx.example()), {}


@register_stage("pattern", PatternConfig, prunes=True)
class PatternPrune(OneShotPrune):
    """PatDNN patterns (4 of 9 taps from the library) and connectivity pruning, one shot."""


@register_stage("magnitude", MagnitudeConfig, prunes=True)
class MagnitudePrune(OneShotPrune):
    """Unstructured magnitude pruning (global or per layer), one shot."""


@register_stage("admm", ADMMConfig, prunes=True)
class ADMM(StageMethod):
    """Extended ADMM towards the target's patterns and connectivity, then the hard prune to it."""

    def run(self, ctx, model):
        cb = ADMMCallback(ctx.config)
        info = {"train": ctx.train(model, ctx.config.epochs, [cb]), "admm": cb.residuals}
        prune(model, ctx.config.target)
        return model, info


@register_stage("gradual", GradualConfig)
class Gradual(StageMethod):
    """Masks tightened on a cubic schedule while training (the stage re-estimates nothing: it trains on)."""

    def run(self, ctx, model):
        c = ctx.config
        cb = GradualCallback(c)
        cbs = [cb]
        if c.teacher:
            cbs.append(KDCallback(ctx.teacher(c.teacher), KDConfig(epochs=c.epochs, teacher=c.teacher, T=c.T,
                                                                   alpha=c.alpha)))
        info = {"train": ctx.train(model, c.epochs, cbs), "gradual": cb.history}
        return model, info
