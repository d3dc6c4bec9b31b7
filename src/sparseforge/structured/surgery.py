"""Layer surgery: physically remove channels and describe the result so it can be rebuilt without pickle.

The architecture spec is plain JSON: for every conv / BN / linear / zero-pad shortcut its sizes, and the
residual branches removed whole (SSL depth). ``apply_arch`` rebuilds a registered model at those sizes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ..errors import SparseforgeError
from ..models.cifar_resnet import PadShortcut
from ..masks import MASK_BUFFER
from ..models.arch import apply_arch, arch_of  # noqa: F401  (re-exported)
from .graph import DependencyGraph


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    mod = model
    for p in parts[:-1]:
        mod = getattr(mod, p)
    return mod, parts[-1]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = _parent(model, name)
    setattr(parent, attr, new)


def _idx(flags: list[bool]) -> torch.Tensor:
    return torch.tensor([i for i, k in enumerate(flags) if k], dtype=torch.long)


def _copy_mask(old: nn.Module, new: nn.Module, fn) -> None:
    m = getattr(old, MASK_BUFFER, None)
    if isinstance(m, torch.Tensor):
        new.register_buffer(MASK_BUFFER, fn(m).clone())


def _conv(m: nn.Conv2d, out_i: torch.Tensor, in_i: torch.Tensor, groups: int) -> nn.Conv2d:
    cin = len(in_i) if groups == 1 else len(out_i)
    new = nn.Conv2d(cin, len(out_i), m.kernel_size, m.stride, m.padding, m.dilation, groups, m.bias is not None,
                    m.padding_mode)
    with torch.no_grad():
        w = m.weight[out_i]
        if groups == 1:
            w = w[:, in_i]
        new.weight.copy_(w)
        if m.bias is not None:
            new.bias.copy_(m.bias[out_i])
    _copy_mask(m, new, (lambda t: t[out_i][:, in_i]) if groups == 1 else (lambda t: t[out_i]))
    return new


def _bn(m: nn.modules.batchnorm._BatchNorm, i: torch.Tensor) -> nn.Module:
    new = type(m)(len(i), m.eps, m.momentum, m.affine, m.track_running_stats)
    with torch.no_grad():
        if m.affine:
            new.weight.copy_(m.weight[i])
            new.bias.copy_(m.bias[i])
        if m.track_running_stats:
            new.running_mean.copy_(m.running_mean[i])
            new.running_var.copy_(m.running_var[i])
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    return new


def _linear(m: nn.Linear, out_i: torch.Tensor, in_i: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(in_i), len(out_i), m.bias is not None)
    with torch.no_grad():
        new.weight.copy_(m.weight[out_i][:, in_i])
        if m.bias is not None:
            new.bias.copy_(m.bias[out_i])
    _copy_mask(m, new, lambda t: t[out_i][:, in_i])
    return new


def remove_channels(model: nn.Module, dg: DependencyGraph, removed: set[int]) -> nn.Module:
    """A physically smaller copy of ``model`` without the channel components ``removed`` (root ids)."""
    new = copy.deepcopy(model)
    for name, n in dg.node_of.items():
        m = dg.modules[name]
        src = n.args[0]
        if isinstance(m, nn.Conv2d):
            keep_out = dg.keep_flags(n, removed)
            if m.groups == 1:
                keep_in = dg.keep_flags(src, removed)
                if all(keep_out) and all(keep_in):
                    continue
                if not any(keep_out):
                    raise SparseforgeError(f"removing every filter of {name}; lower the pruning ratio")
                _set(new, name, _conv(m, _idx(keep_out), _idx(keep_in), 1))
            elif m.groups == m.in_channels == m.out_channels and not all(keep_out):
                i = _idx(keep_out)
                _set(new, name, _conv(m, i, i, len(i)))
        elif isinstance(m, nn.Linear):
            keep_out, keep_in = dg.keep_flags(n, removed), dg.keep_flags(src, removed)
            if not (all(keep_out) and all(keep_in)):
                _set(new, name, _linear(m, _idx(keep_out), _idx(keep_in)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            keep = dg.keep_flags(n, removed)
            if not all(keep):
                _set(new, name, _bn(m, _idx(keep)))
        elif isinstance(m, PadShortcut):
            keep = dg.keep_flags(n, removed)
            c_in = len(dg.keep_flags(src, removed))
            before = sum(keep[: m.pad_before])
            after = sum(keep[m.pad_before + c_in:])
            _set(new, name, PadShortcut(m.stride, before, after))
    if hasattr(model, "sf_spec"):
        new.sf_spec = dict(model.sf_spec, arch=arch_of(new))
    return new


def producer_slices(model: nn.Module, dg: DependencyGraph, removed: set[int]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, channel indices) of everything that produces the components ``removed``: filters, biases,
    BN scale and shift. Zeroing them makes those channels exactly zero everywhere; penalising them drives the
    channels towards zero during training (growing regularisation)."""
    mods = dict(model.named_modules())
    out: list[tuple[nn.Parameter, torch.Tensor]] = []
    for name, n in dg.node_of.items():
        m = mods[name]
        flags = dg.keep_flags(n, removed)
        gone = torch.tensor([i for i, k in enumerate(flags) if not k], dtype=torch.long)
        if not len(gone):
            continue
        if isinstance(m, nn.Conv2d | nn.Linear):
            if isinstance(m, nn.Conv2d) and m.groups not in (1, m.out_channels):
                continue
            out.append((m.weight, gone))
            if m.bias is not None:
                out.append((m.bias, gone))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            out += [(m.weight, gone), (m.bias, gone)]
    return out


def zero_channels(model: nn.Module, dg: DependencyGraph, removed: set[int]) -> None:
    """Zero (in place) everything that produces the components ``removed``: filters, biases, BN scale and shift.

    The removed channels are then exactly zero everywhere, so the model computes what ``remove_channels`` gives;
    the surgery tests rest on this equivalence.
    """
    with torch.no_grad():
        for p, idx in producer_slices(model, dg, removed):
            p[idx] = 0


