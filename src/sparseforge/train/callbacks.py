"""Trainer callbacks: the hook interface, and masked training (always on: pruned weights stay exactly zero)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..masks import MASK_BUFFER, mask_optimizer_state, masked_modules

if TYPE_CHECKING:
    from .loop import Trainer


class Callback:
    """Hooks into :class:`Trainer`; override what you need. State must be tensors/JSON (no pickle)."""

    name: str = "callback"

    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def on_epoch_begin(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_loss(self, trainer: "Trainer", loss: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss
    def on_batch(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform a training batch before the forward (mixing regularisers); y may become soft targets."""
        return x, y
    def on_after_backward(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer") -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...
    def state_dict(self) -> dict[str, Any]:
        return {}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...



class MaskCallback(Callback):
    """Masked training: gradients and optimiser state of pruned weights are zeroed, so they stay exactly 0.

    Weights are *not* re-zeroed after each step on purpose: zero weight + zero
    gradient + zero optimiser state is a fixed point of SGD (momentum, Nesterov,
    weight decay), Adam and AdamW, and the tests check that it holds.
    """

    name = "masks"

    def on_train_begin(self, trainer) -> None:
        with torch.no_grad():
            for _, m in masked_modules(trainer.model):
                m.weight.mul_(getattr(m, MASK_BUFFER))
        mask_optimizer_state(trainer.model, trainer.optimizer)

    def on_after_backward(self, trainer) -> None:
        for _, m in masked_modules(trainer.model):
            if m.weight.grad is not None:
                m.weight.grad.mul_(getattr(m, MASK_BUFFER))
