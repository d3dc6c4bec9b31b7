"""Structured sparsity: dependency groups, importance, scheduling, surgery, SSL and early-bird tickets."""

from .graph import DependencyGraph, Group, Slot, groups
from .importance import IMPORTANCE, score_groups
from .prune import CostModel, StructuredConfig, count_macs, count_params, prune_structured, select_step
from .surgery import apply_arch, arch_of, remove_channels, zero_channels

__all__ = ["groups", "DependencyGraph", "Group", "Slot", "IMPORTANCE", "score_groups", "StructuredConfig",
           "prune_structured", "count_macs", "count_params", "CostModel", "apply_arch", "arch_of", "remove_channels",
           "zero_channels", "select_step"]

from ..sparsity import register_method  # noqa: E402

register_method("structured", StructuredConfig, prune_structured)
