"""Checkpoints live in ``sparseforge.checkpoint`` (base layer: weights loading reads run directories too)."""

from ..checkpoint import (  # noqa: F401
    FORMAT, versions, split_state, join_state, CheckpointRef, save_checkpoint, latest_checkpoint, load_checkpoint, rng_state, set_rng_state)
