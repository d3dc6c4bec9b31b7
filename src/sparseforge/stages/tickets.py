"""Lottery tickets: iterative magnitude pruning with rewinding (and the KD ticket)."""

from __future__ import annotations

import copy
from typing import Any

from ..distill import KDCallback, KDConfig
from ..errors import ConfigError
from ..tickets import (IMPConfig, SnapshotCallback, imp_prune, load_state, rewind_step, rewind_weights,
                       save_state)
from ..distributed import barrier, is_main
from .base import StageMethod, register_stage
from .. import rundir


@register_stage("imp", IMPConfig)
class IMP(StageMethod):
    """Rounds live in <stage>/round-N (each resumable); the rewind target and start weights are files."""

    def run(self, ctx, model):
        c = ctx.config
        cfg = ctx.train_config({"epochs": c.epochs})
        spe = ctx.loaders(cfg)[0].num_batches()
        spe = min(spe, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else spe
        rs = rewind_step(c.rewind, spe)
        start_f, snap_f = ctx.dir / "start.safetensors", ctx.dir / "rewind.safetensors"
        if not ctx.exists(start_f):
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
            rdir = ctx.dir / (f"round-{r}" if r < c.rounds else "final")
            rdir.mkdir(parents=True, exist_ok=True)
            if ctx.exists(rdir / rundir.DONE):
                model = ctx.load_stage_model(model, rdir / rundir.MODEL)
                rounds.append(ctx.read_json(rdir / rundir.DONE))
                continue
            cbs = []
            if r == 0 and rs is not None and rs >= 0 and not snap_f.exists():
                cbs.append(SnapshotCallback(rs, snap_f))
            if teacher is not None:
                cbs.append(KDCallback(teacher, KDConfig(T=c.kd_T, alpha=c.kd_alpha)))
            tr = ctx.train(model, c.epochs, cbs, directory=rdir)
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
                rec["eval_after_rewind"] = ctx.evaluate(model)
            ctx.save_model(model, rdir / rundir.MODEL)
            ctx.write_json(rdir / rundir.DONE, rec)
            rounds.append(rec)
        return model, {"imp_rounds": rounds}
