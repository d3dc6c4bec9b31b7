"""Structured pruning stages: dependency-group channel pruning, depth, SSL group lasso, early-bird tickets."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import Config, opt

from ..sparsity import prune
from ..structured import (DepthConfig, EarlyBirdCallback, EarlyBirdConfig, GroupLassoCallback, GroupLassoConfig,
                          StructuredConfig, drop_blocks, growing_depth, growing_reg, plan_depth, remove_channels,
                          ssl_remove)
from .base import StageMethod, register_stage


@register_stage("structured", StructuredConfig, prunes=True)
class Structured(StageMethod):
    """Channels removed by importance (Taylor importance reads gradients of a few batches); with
    ``regularize_epochs`` the channels to remove are first faded out by growing regularization."""

    def run(self, ctx, model):
        c = ctx.config
        if c.importance == "taylor":
            ctx.gradients(model)
        if c.regularize_epochs:
            cb, dg, rem = growing_reg(model, c, ctx.example())
            info = {"train": ctx.train(model, c.regularize_epochs, [cb]), "growing_reg": cb.history}
            return remove_channels(model, dg, rem), info
        return prune(model, c, example_input=ctx.example()), {}


@register_stage("depth", DepthConfig, prunes=True)
class Depth(StageMethod):
    def run(self, ctx, model):
        c = ctx.config
        if getattr(c, "importance", None) == "taylor":
            ctx.gradients(model)
        if c.regularize_epochs or c.inplace_epochs:
            return self._trained(ctx, model)
        model = prune(model, c, example_input=ctx.example(), calibration=ctx.calibration(c.calibration_batches))
        return model, {"depth": getattr(model, "sf_depth_history", [])}

    def _trained(self, ctx, model):
        """Choose the blocks, train with them (fade their branches out for ``regularize_epochs`` epochs, or train
        the shallow sub-network in place for ``inplace_epochs``), then drop them. The choice is written to
        ``depth_plan.json`` first, so a resumed stage trains with the same blocks."""
        from ..structured import InplaceDepthCallback

        c = ctx.config
        plan_file = ctx.dir / "depth_plan.json"
        if ctx.exists(plan_file):
            plan = ctx.read_json(plan_file)
        else:
            plan = plan_depth(model, c, ctx.example(), ctx.calibration(c.calibration_batches))
            ctx.dir.mkdir(parents=True, exist_ok=True)
            ctx.write_json(plan_file, plan)
        blocks = [h["block"] for h in plan]
        info: dict[str, Any] = {"depth": plan}
        if c.inplace_epochs:
            ctx.log(f"depth: training the net without {len(blocks)} residual branches inside the full net for "
                    f"{c.inplace_epochs} epoch(s): {', '.join(blocks)}")
            cb = InplaceDepthCallback(blocks, T=c.inplace_T, alpha=c.inplace_alpha, warmup_epochs=c.inplace_warmup)
            info["train"] = ctx.train(model, c.inplace_epochs, [cb])
            info["inplace"] = cb.history
            info["full_acc_before_drop"] = info["train"].get("test_acc")    # the deep net (the teacher) at the end
            info["acc_before_drop"] = cb.history[-1].get("sub_test_acc") if cb.history else None
        else:
            ctx.log(f"depth: fading {len(blocks)} residual branches for {c.regularize_epochs} epoch(s): "
                    f"{', '.join(blocks)}")
            cb = growing_depth(model, blocks, c.reg_max)
            info["train"] = ctx.train(model, c.regularize_epochs, [cb])
            info["growing_reg"] = cb.history
            info["acc_before_drop"] = info["train"].get("test_acc")     # the last epoch's evaluation, branches faded
        return drop_blocks(model, blocks, plan), info


@register_stage("ssl", GroupLassoConfig, prunes=True)
class SSL(StageMethod):
    def run(self, ctx, model):
        cb = GroupLassoCallback(ctx.config)
        info = {"train": ctx.train(model, ctx.config.epochs, [cb]), "group_norms": cb.history}
        return ssl_remove(model, ctx.config, ctx.example()), info


@register_stage("earlybird", EarlyBirdConfig, prunes=True)
class EarlyBird(StageMethod):
    def run(self, ctx, model):
        c = ctx.config
        cb = EarlyBirdCallback(c)
        info = {"train": ctx.train(model, c.epochs, [cb]),
                "earlybird": {"drawn_epoch": cb.drawn_epoch, "distances": cb.distances}}
        model = prune(model, StructuredConfig(importance="bn", ratio=c.ratio, normalize=False),
                      example_input=ctx.example())
        return model, info


@dataclasses.dataclass(frozen=True)
class ReparameterizeConfig(Config):
    """Fold every re-parameterizable block (RepGhost, RepVGG, registered blocks) into its inference form: before
    pattern pruning (the folded kernels get the patterns) or before compile."""

    runs: int = opt(20, "timed PyTorch runs of the train form vs the folded form, batch 1", min=5)


@register_stage("reparameterize", ReparameterizeConfig)
class Reparameterize(StageMethod):
    def run(self, ctx, model):
        from ..models import mark_reparameterized, reparameterize
        from ..models.reparam import count_foldable
        from ..structured import count_macs

        import copy

        import torch

        from ..report.latency import measure

        x = ctx.example()
        model.eval()
        train_form = copy.deepcopy(model)
        before = {"blocks": count_foldable(model), "params": sum(p.numel() for p in model.parameters()),
                  "macs": count_macs(model, x)}
        model = mark_reparameterized(reparameterize(model))
        after = {"params": sum(p.numel() for p in model.parameters()), "macs": count_macs(model, x)}
        with torch.inference_mode():
            lat = measure({"train form": lambda: train_form(x), "folded": lambda: model(x)}, runs=ctx.config.runs)
        lat["threads"] = torch.get_num_threads()
        ctx.log(f"reparameterize: folded {before['blocks']} blocks, params {before['params']:,} -> {after['params']:,}")
        return model, {"reparameterize": {"folded_blocks": before["blocks"], "before": before, "after": after,
                                          "latency": lat}}
