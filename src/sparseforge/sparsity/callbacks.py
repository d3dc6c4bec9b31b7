"""Training callbacks that keep pruned weights pruned."""

from __future__ import annotations

import torch

from ..train.loop import Callback
from .mask import MASK_BUFFER, mask_optimizer_state, masked_modules


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
