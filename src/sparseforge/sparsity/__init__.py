"""Sparsity methods behind one entry point: ``prune(model, config)``.

Each method is a frozen config class plus a transform registered for it; the
transform attaches masks (or, for structured methods, returns a smaller model).
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from ..config import Config
from ..errors import SparseforgeError
from .admm import ADMMCallback, ADMMConfig
from ..masks import ensure_sparsity_buffers
from .callbacks import MaskCallback
from .magnitude import MagnitudeConfig, prune_magnitude
from .mask import Mask, apply_masks, attach_mask, fold_masks, get_mask, mask_optimizer_state, mask_state, masked_modules
from .pattern import PatternConfig, get_library, library_strings, prune_pattern

_TRANSFORMS: dict[type, Callable[..., nn.Module]] = {}
METHOD_CONFIGS: dict[str, type] = {}


def register_method(name: str, config_cls: type, fn: Callable[..., nn.Module]) -> None:
    _TRANSFORMS[config_cls] = fn
    METHOD_CONFIGS[name] = config_cls


register_method("pattern", PatternConfig, prune_pattern)
register_method("magnitude", MagnitudeConfig, prune_magnitude)


def prune(model: nn.Module, config: Config, **kwargs: Any) -> nn.Module:
    """Apply a sparsity method; returns the model (pruned in place for mask-based methods).

    Masks are buffers (``weight_mask``) next to the weights, and masked weights are exactly zero.
    Applying a method again never grows a mask.
    """
    fn = _TRANSFORMS.get(type(config))
    if fn is None:
        known = ", ".join(c.__name__ for c in _TRANSFORMS)
        raise SparseforgeError(f"{type(config).__name__} is not a pruning config; use one of {known}")
    return fn(model, config, **kwargs)


__all__ = ["prune", "fold_masks", "Mask", "attach_mask", "get_mask", "apply_masks", "masked_modules", "mask_state",
           "mask_optimizer_state", "PatternConfig", "MagnitudeConfig", "ADMMConfig", "ADMMCallback", "MaskCallback",
           "get_library", "library_strings", "register_method", "METHOD_CONFIGS", "ensure_sparsity_buffers"]
