"""Layer sizes of a structurally pruned model: ``arch_of`` records them (saved with the weights), ``apply_arch``
rebuilds a freshly created model to them, so a pruned checkpoint loads strictly without the pruning code."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..errors import SparseforgeError
from .cifar_resnet import PadShortcut


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parts = name.split(".")
    parent = model
    for p in parts[:-1]:
        parent = getattr(parent, p)
    setattr(parent, parts[-1], new)


def arch_of(model: nn.Module) -> dict[str, Any]:
    """Sizes of every resizable layer (JSON-able): enough to rebuild the model with ``apply_arch``."""
    layers: dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            layers[name] = {"type": "conv", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            layers[name] = {"type": "bn", "features": m.num_features}
        elif isinstance(m, nn.Linear):
            layers[name] = {"type": "linear", "in": m.in_features, "out": m.out_features}
        elif isinstance(m, PadShortcut):
            layers[name] = {"type": "pad_shortcut", "before": m.pad_before, "after": m.pad_after}
    removed = sorted(name for name, m in model.named_modules() if getattr(m, "branch_removed", False))
    return {"format": "sparseforge-arch-1", "layers": layers, "removed_branches": removed}


def apply_arch(model: nn.Module, arch: dict[str, Any]) -> nn.Module:
    """Resize ``model`` (freshly built, any weights) to ``arch``; weights of resized layers are re-initialised."""
    if not isinstance(arch, dict) or arch.get("format") != "sparseforge-arch-1":
        raise SparseforgeError("architecture spec must be a dict with format 'sparseforge-arch-1' (from arch_of)")
    mods = dict(model.named_modules())
    for name, spec in arch["layers"].items():
        m = mods.get(name)
        if m is None:
            raise SparseforgeError(f"architecture spec names layer {name!r}, which the model does not have; "
                                   "build the same base model the spec was made from")
        t = spec["type"]
        if t == "conv" and isinstance(m, nn.Conv2d):
            if (m.in_channels, m.out_channels, m.groups) != (spec["in"], spec["out"], spec["groups"]):
                _set(model, name, nn.Conv2d(spec["in"], spec["out"], m.kernel_size, m.stride, m.padding, m.dilation,
                                            spec["groups"], m.bias is not None, m.padding_mode))
        elif t == "bn" and isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.num_features != spec["features"]:
                _set(model, name, type(m)(spec["features"], m.eps, m.momentum, m.affine, m.track_running_stats))
        elif t == "linear" and isinstance(m, nn.Linear):
            if (m.in_features, m.out_features) != (spec["in"], spec["out"]):
                _set(model, name, nn.Linear(spec["in"], spec["out"], m.bias is not None))
        elif t == "pad_shortcut" and isinstance(m, PadShortcut):
            m.pad_before, m.pad_after = int(spec["before"]), int(spec["after"])
        else:
            raise SparseforgeError(f"architecture spec says {name} is a {t}, the model has a {type(m).__name__}")
    for name in arch.get("removed_branches", []):
        blk = mods.get(name)
        if blk is None or not hasattr(blk, "remove_branch"):
            raise SparseforgeError(f"architecture spec removes the residual branch of {name!r}, which is not a block")
        blk.remove_branch()
    return model
