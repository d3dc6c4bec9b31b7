"""MaskCallback lives in ``sparseforge.train.callbacks`` (the loop keeps masks on without knowing methods)."""

from ..train.callbacks import MaskCallback  # noqa: F401
