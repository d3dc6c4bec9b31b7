"""User-facing errors.

Every problem a user can cause (bad path, bad file, bad field) is raised as a
:class:`SparseforgeError` whose message names the problem *and* the fix. The
CLI prints these as one line without a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class SparseforgeError(Exception):
    """A problem with the user's input, reported as one clear line."""


class ConfigError(SparseforgeError, ValueError):
    """A config field has a wrong name, type or value."""


class DataError(SparseforgeError):
    """A dataset is missing or malformed."""


class CheckpointError(SparseforgeError):
    """A checkpoint is missing, truncated, or for another architecture."""


class RunDirError(SparseforgeError):
    """A run directory would be overwritten or cannot be resumed."""


class TrainingDivergedError(SparseforgeError, FloatingPointError):
    """The loss became NaN or Inf (a FloatingPointError too, for callers that caught the old one)."""
