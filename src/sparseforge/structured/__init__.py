"""Structured sparsity: dependency groups, importance, scheduling, surgery, SSL and early-bird tickets."""

from .depth import DepthConfig, block_macs, candidate_blocks, drop_blocks, growing_depth, plan_depth, prune_depth
from .graph import DependencyGraph, Group, Slot, groups
from .importance import IMPORTANCE, score_groups
from .prune import CostModel, StructuredConfig, count_macs, count_params, prune_structured, select_step
from .ssl import (EarlyBirdCallback, EarlyBirdConfig, GroupLassoCallback, GroupLassoConfig, bn_channel_mask,
                  early_bird_drawn, group_norms, mask_distance, ssl_remove)
from .inplace import InplaceDepthCallback, shared_subnet
from .regrow import GrowingRegCallback, growing_reg, plan_removal
from .surgery import apply_arch, arch_of, producer_slices, remove_channels, zero_channels

__all__ = ["groups", "DependencyGraph", "Group", "Slot", "IMPORTANCE", "score_groups", "StructuredConfig",
           "prune_structured", "count_macs", "count_params", "CostModel", "apply_arch", "arch_of", "remove_channels",
           "zero_channels", "producer_slices", "select_step", "GrowingRegCallback", "growing_reg", "plan_removal", "GroupLassoConfig", "GroupLassoCallback", "EarlyBirdConfig",
           "EarlyBirdCallback", "group_norms", "DepthConfig", "prune_depth", "plan_depth", "drop_blocks", "growing_depth", "InplaceDepthCallback", "shared_subnet", "candidate_blocks", "block_macs", "ssl_remove", "bn_channel_mask", "mask_distance", "early_bird_drawn"]

from ..sparsity import register_method  # noqa: E402

register_method("structured", StructuredConfig, prune_structured)
register_method("depth", DepthConfig, prune_depth)
