"""Lottery tickets: iterative magnitude pruning with weight / LR / pre-trained rewinding, and the KD ticket.

A round = train -> prune ``fraction`` of the surviving weights (global or per layer, by magnitude; masks only
shrink) -> rewind. Rewind targets: "lr" (keep the trained weights, restart the LR schedule: Renda et al.),
"500it" / "2ep" (weights stored at that point of round 0's training: Frankle et al.), "init" (step 0),
"pretrained" (the weights the stage started from). Unpruned entries are restored exactly; pruned ones are 0.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch
import torch.nn as nn

from .config import Config, ConfigError, opt
from .masks import apply_masks, attach_mask, get_mask
from .sparsity.scope import first_conv_name
from .train.loop import Callback


@dataclasses.dataclass(frozen=True)
class IMPConfig(Config):
    """Iterative magnitude pruning: ``rounds`` x (train ``epochs`` -> prune ``fraction`` of survivors -> rewind)."""

    rounds: int = opt(3, "pruning rounds", min=1)
    fraction: float = opt(0.2, "share of the surviving weights removed each round", min=0.0, max=1.0)
    epochs: int = opt(2, "training epochs per round (and of the final retraining)", min=1)
    rewind: str = opt("lr", "'lr' (learning-rate rewinding), '500it' / '2ep' (weights at that point of round 0), "
                            "'init' (step 0) or 'pretrained' (the weights the stage started from)")
    scope: Literal["global", "layer"] = opt("global", "one magnitude threshold over all pruned layers, or per layer")
    prune_first_conv: bool = opt(False, "also prune the first conv")
    prune_linear: bool = opt(False, "also prune the classifier")
    kd: bool = opt(False, "train every round with the stage's starting model as teacher (KD ticket)")
    kd_T: float = opt(5.0, "KD temperature", min=1e-3)
    kd_alpha: float = opt(0.9, "KD weight", min=0.0, max=1.0)

    def validate(self) -> None:
        rewind_step(self.rewind, 1)   # raises on a bad value


def rewind_step(rewind: str, steps_per_epoch: int) -> int | None:
    """The optimizer step whose weights are restored (None for LR rewinding; -1 for 'pretrained')."""
    if rewind == "lr":
        return None
    if rewind == "pretrained":
        return -1
    if rewind == "init":
        return 0
    m = re.fullmatch(r"(\d+)(it|ep)", rewind)
    if not m:
        raise ConfigError(f"IMPConfig.rewind: {rewind!r} is not 'lr', 'init', 'pretrained', '<N>it' or '<N>ep' "
                          "(e.g. '500it', '2ep')")
    n = int(m.group(1))
    return n if m.group(2) == "it" else n * steps_per_epoch


def prunable(model: nn.Module, cfg: IMPConfig) -> list[tuple[str, nn.Module]]:
    first = first_conv_name(model)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and cfg.prune_linear):
            if name == first and not cfg.prune_first_conv:
                continue
            out.append((name, m))
    return out


def imp_prune(model: nn.Module, cfg: IMPConfig) -> dict[str, int]:
    """Remove exactly round(fraction * survivors) weights (globally or per layer); masks only shrink."""
    layers = prunable(model, cfg)
    for _, m in layers:
        if get_mask(m) is None:
            attach_mask(m, torch.ones_like(m.weight))
    with torch.no_grad():
        if cfg.scope == "global":
            groups = [layers]
        else:
            groups = [[lm] for lm in layers]
        for grp in groups:
            scores = torch.cat([torch.where(get_mask(m).tensor > 0, m.weight.abs(), torch.full_like(m.weight, -1.0))
                                .flatten() for _, m in grp])
            alive = int((scores >= 0).sum())
            k = int(round(cfg.fraction * alive))
            keep = torch.ones_like(scores)
            dead = scores < 0
            keep[dead] = 0
            if k:
                order = torch.argsort(torch.where(dead, torch.full_like(scores, float("inf")), scores), stable=True)[:k]
                keep[order] = 0
            off = 0
            for _, m in grp:
                n = m.weight.numel()
                attach_mask(m, keep[off:off + n].reshape(m.weight.shape))
                off += n
    apply_masks(model)
    return {n: int(get_mask(m).tensor.sum()) for n, m in layers}


def rewind_weights(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Restore the stored parameters and BN statistics (masked weights stay 0)."""
    with torch.no_grad():
        state = model.state_dict()
        for k, v in snapshot.items():
            if k in state and not k.endswith("weight_mask"):
                state[k].copy_(v)
    apply_masks(model)


class SnapshotCallback(Callback):
    """Stores the model's state at optimizer step ``step`` (weight rewinding's target)."""

    def __init__(self, step: int, path=None):
        self.step = step
        self.path = path          # written as soon as it is taken: a resumed round must not lose it
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, trainer) -> None:
        if self.step == 0 and self.state is None:
            self._take(trainer)

    def on_step_end(self, trainer) -> None:
        if trainer.step == self.step and self.state is None:
            self._take(trainer)

    def _take(self, trainer) -> None:
        # a CPU copy whatever device trains: rewinding and the saved file work on the model back on the CPU
        self.state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in trainer.model.state_dict().items()
                      if not k.endswith("weight_mask")}
        from .distributed import is_main

        if self.path is not None and is_main():
            save_state(self.state, self.path)


def save_state(state: dict[str, torch.Tensor], path) -> None:
    from safetensors.torch import save

    from .utils import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}))


def load_state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


__all__ = ["save_state", "load_state", "IMPConfig", "imp_prune", "rewind_weights", "rewind_step", "SnapshotCallback", "prunable"]
