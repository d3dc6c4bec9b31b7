"""Low-bit stages: power-of-two weights and progressive precision, folded to plain float weights at the end."""

from __future__ import annotations

from ..lowbit import (Pow2Config, ProgressivePrecisionCallback, ProgressivePrecisionConfig, apply_fake_quant,
                      apply_pow2, fold_lowbit, pow2_storage)
from ..structured import count_macs
from .base import StageMethod, register_stage


@register_stage("pow2", Pow2Config)
class Pow2(StageMethod):
    def run(self, ctx, model):
        apply_pow2(model, ctx.config)
        info = {"storage_bits_before": pow2_storage(model)}
        info["train"] = ctx.train(model, ctx.config.epochs)
        info["storage_bits"] = pow2_storage(model)
        fold_lowbit(model)
        return model, info


@register_stage("precision", ProgressivePrecisionConfig)
class ProgressivePrecision(StageMethod):
    def run(self, ctx, model):
        macs = count_macs(model, ctx.example())
        apply_fake_quant(model)
        cb = ProgressivePrecisionCallback(ctx.config, macs)
        info = {"train": ctx.train(model, ctx.config.epochs, [cb])}
        info["precision"] = {"final_stage": cb.stage, "switch_steps": cb.switches, "bitops": cb.bitops,
                             "bitops_fixed_8bit": cb.bitops_8bit, "saved": cb.saved()}
        fold_lowbit(model)
        return model, info
