"""Masks live in ``sparseforge.masks`` (a base-layer module: models and training use them too)."""

from ..masks import (  # noqa: F401
    MASK_BUFFER, Mask, get_mask, attach_mask, masked_modules, apply_masks, mask_optimizer_state, fold_masks, mask_state)
