"""Which layers a sparsity method touches, and how.

Defaults follow PatDNN: 3x3 convs get patterns + connectivity, 1x1 convs get
connectivity only, depthwise 3x3 convs get patterns only (connectivity would
remove whole channels), the first conv and the classifier stay dense, and
every other layer is left alone -- and listed as such, never silently.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch.nn as nn

PATTERN, PATTERN_ONLY, CONNECTIVITY, DENSE = "pattern", "pattern-only", "connectivity", "dense"


@dataclass
class LayerChoice:
    name: str
    module: nn.Module
    role: str          # one of PATTERN, PATTERN_ONLY, CONNECTIVITY, DENSE
    reason: str = ""


def matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def first_conv_name(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    return None


def choose_layers(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                  prune_first_conv: bool = False, prune_1x1: bool = True) -> list[LayerChoice]:
    """Every Conv2d/Linear with the role it gets (DENSE ones carry the reason)."""
    first = first_conv_name(model)
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(m, nn.Linear):
            out.append(LayerChoice(name, m, DENSE, "classifier/linear layers stay dense"))
            continue
        if include and not matches(name, include):
            out.append(LayerChoice(name, m, DENSE, "not in include"))
            continue
        if exclude and matches(name, exclude):
            out.append(LayerChoice(name, m, DENSE, "excluded"))
            continue
        if name == first and not prune_first_conv:
            out.append(LayerChoice(name, m, DENSE, "first conv stays dense (prune_first_conv=false)"))
            continue
        k = tuple(m.kernel_size)
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        if k == (3, 3) and m.groups == 1:
            out.append(LayerChoice(name, m, PATTERN))
        elif k == (3, 3) and depthwise:
            out.append(LayerChoice(name, m, PATTERN_ONLY, "depthwise: connectivity would remove channels"))
        elif k == (1, 1) and m.groups == 1:
            out.append(LayerChoice(name, m, CONNECTIVITY if prune_1x1 else DENSE, "" if prune_1x1 else "prune_1x1=false"))
        else:
            out.append(LayerChoice(name, m, DENSE, f"kernel {k[0]}x{k[1]}, groups={m.groups}: not supported by patterns"))
    return out
