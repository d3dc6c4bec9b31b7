"""Sparsity artefacts kept as buffers: masks (validated 0/1 value objects, attached as explicit buffers, folded
explicitly) and the pattern library. A base-layer module: models load them, training keeps them, methods make them.

A pruned layer carries a ``weight_mask`` buffer of the weight's shape, and its
weight is kept exactly zero where the mask is 0 (the mask is applied to the
weight, its gradient and its optimiser state; see :class:`MaskCallback`). No
forward hooks or parametrizations: models stay plain modules that deepcopy,
``state_dict`` and safetensors handle natively, and the compiler sees ordinary
convolutions. Masks only ever shrink: attaching a new mask intersects it with
the old one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from .errors import SparseforgeError
from .utils import model_device

MASK_BUFFER = "weight_mask"


@dataclass(frozen=True, eq=False)
class Mask:
    """A 0/1 float tensor with a fixed shape. Construction validates; operations never grow it."""

    tensor: torch.Tensor

    def __post_init__(self) -> None:
        t = self.tensor
        if not isinstance(t, torch.Tensor):
            raise SparseforgeError(f"a mask must be a tensor, got {type(t).__name__}")
        if t.dtype == torch.bool:
            t = t.float()
        elif not torch.is_floating_point(t):
            t = t.float()
        if t.numel() and not bool(((t == 0) | (t == 1)).all()):
            bad = t[(t != 0) & (t != 1)].flatten()[:3].tolist()
            raise SparseforgeError(f"a mask must hold only 0 and 1; found {bad}")
        object.__setattr__(self, "tensor", t.detach().to(torch.float32).contiguous())

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def density(self) -> float:
        return float(self.tensor.mean()) if self.tensor.numel() else 1.0

    def kept(self) -> int:
        return int(self.tensor.sum())

    def __and__(self, other: "Mask") -> "Mask":
        if other.shape != self.shape:
            raise SparseforgeError(f"cannot combine masks of shapes {tuple(self.shape)} and {tuple(other.shape)}")
        return Mask(self.tensor * other.tensor)

    def is_subset_of(self, other: "Mask") -> bool:
        return bool((self.tensor <= other.tensor).all())


def get_mask(module: nn.Module) -> Mask | None:
    t = getattr(module, MASK_BUFFER, None)
    return Mask(t) if isinstance(t, torch.Tensor) else None


def attach_mask(module: nn.Module, mask: Mask | torch.Tensor) -> Mask:
    """Attach (intersecting with any existing mask) and zero the masked weights. Returns the mask in effect."""
    if not isinstance(mask, Mask):
        mask = Mask(mask)
    w = module.weight
    if mask.shape != w.shape:
        raise SparseforgeError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(w.shape)}")
    old = get_mask(module)
    new = mask if old is None else (old & mask)
    t = new.tensor.to(device=w.device)
    if old is None:
        module.register_buffer(MASK_BUFFER, t)
    else:
        getattr(module, MASK_BUFFER).copy_(t)
    with torch.no_grad():
        w.mul_(t.to(w.dtype))
    return new


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        # modules that build their weight in forward (Pow2Conv2d) apply their mask there and have no .weight
        if isinstance(getattr(m, MASK_BUFFER, None), torch.Tensor) and isinstance(getattr(m, "weight", None), torch.Tensor):
            yield name, m


def apply_masks(model: nn.Module) -> None:
    """Re-zero masked weights (for users running their own training loop: call after each optimizer step)."""
    with torch.no_grad():
        for _, m in masked_modules(model):
            m.weight.mul_(getattr(m, MASK_BUFFER).to(m.weight.dtype))


def mask_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Zero optimizer state (momentum, Adam moments) of pruned weights, so they cannot move again."""
    for _, m in masked_modules(model):
        mk = getattr(m, MASK_BUFFER)
        st = optimizer.state.get(m.weight)
        if not st:
            continue
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == mk.shape:
                v.mul_(mk.to(v.dtype))


def fold_masks(model: nn.Module) -> nn.Module:
    """Bake masks into the weights and drop the buffers (the model is then plain and dense-shaped)."""
    for _, m in list(masked_modules(model)):
        with torch.no_grad():
            m.weight.mul_(getattr(m, MASK_BUFFER).to(m.weight.dtype))
        del m._buffers[MASK_BUFFER]
    return model


def mask_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{MASK_BUFFER}" if n else MASK_BUFFER: getattr(m, MASK_BUFFER) for n, m in masked_modules(model)}


LIBRARY_BUFFER = "sf_pattern_library"
COUNTS_BUFFER = "sf_pattern_counts"


def get_library(model: nn.Module) -> torch.Tensor | None:
    lib = getattr(model, LIBRARY_BUFFER, None)
    return lib if isinstance(lib, torch.Tensor) else None


def set_library(model: nn.Module, library: torch.Tensor, counts: torch.Tensor | None = None) -> None:
    """Store the pattern library on the model (a buffer: saved with the weights, kept by deepcopy)."""
    lib = library.detach().float().to(model_device(model), copy=True)    # a buffer lives where the model does
    if get_library(model) is not None:
        del model._buffers[LIBRARY_BUFFER]
    model.register_buffer(LIBRARY_BUFFER, lib)
    if counts is not None:
        if COUNTS_BUFFER in model._buffers:
            del model._buffers[COUNTS_BUFFER]
        model.register_buffer(COUNTS_BUFFER, counts.detach().to(lib.device, torch.int64, copy=True))


def ensure_sparsity_buffers(model: nn.Module, state: dict) -> None:
    """Create the mask / pattern-library buffers a saved state has and the model lacks (so a strict load works).

    A checkpoint taken after pruning (or after ADMM extracted its library) holds buffers that a freshly built
    model does not have yet; resuming must recreate them before ``load_state_dict``.
    """
    own = model.state_dict()
    if LIBRARY_BUFFER in state and LIBRARY_BUFFER not in own:
        set_library(model, state[LIBRARY_BUFFER], state.get(COUNTS_BUFFER))
    modules = dict(model.named_modules())
    suffix = "." + MASK_BUFFER
    for k, t in state.items():
        if k.endswith(suffix) and k not in own:
            mod = modules.get(k[: -len(suffix)])
            if mod is not None and getattr(mod, "weight", None) is not None and mod.weight.shape == t.shape:
                attach_mask(mod, t)
