"""In-place depth distillation: train the shallow network *inside* the deep one, then cut.

Why: a cut-then-distil schedule (``depth`` stage, then ``kd`` from an earlier stage) splits the budget. The
teacher only trains for the epochs before the cut, and the student only for the epochs after it. Measured on
ResNet-56 (``bench/structured.py``), the student ends at about its teacher's accuracy. The dense control keeps
improving for the whole budget. Here both train for every epoch of the budget, as in the "in-place distillation"
of slimmable / BigNAS networks (Yu & Huang 2019; Yu et al. 2020). Every step trains the full network on the labels.
It also trains the sub-network that skips the chosen residual branches, with the *same weights*, on the full
network's soft outputs (detached) and, with weight ``1 - alpha``, on the labels. The teacher is then as trained as
the control, and the student never takes an abrupt cut. Cost: one extra forward and backward of the shallow net per
step (~1.5x a dense step for half the blocks).

The sub-network is a second module object that shares every parameter with the model but keeps BatchNorm
*statistics* of its own: the two networks see differently distributed activations in the kept blocks, and mixed
running statistics would make both evaluations wrong. The sub-network's statistics are checkpointed with the
callback state. After training, ``drop_blocks`` makes the shallow model and the recipe re-estimates its statistics.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..distill import kd_loss
from ..errors import SparseforgeError
from ..train.loop import Callback, evaluate


def shared_subnet(model: nn.Module, blocks: Iterable[str]) -> nn.Module:
    """A module that runs ``model`` with the residual branches of ``blocks`` skipped, sharing its parameters (not its
    buffers: BatchNorm statistics are the sub-network's own)."""
    memo = {id(p): p for p in model.parameters()}
    sub = copy.deepcopy(model, memo)
    mods = dict(sub.named_modules())
    for n in blocks:
        if n not in mods or not hasattr(mods[n], "remove_branch"):
            raise SparseforgeError(f"in-place depth distillation: {n!r} is not a residual block of this model")
        mods[n].branch_removed = True       # the branch's weights stay (shared); only the forward skips them
    return sub


class InplaceDepthCallback(Callback):
    """Adds ``weight * kd(sub(x), full(x).detach())`` to the loss of every step (see the module docstring)."""

    name = "inplace_depth"

    def __init__(self, blocks: list[str], T: float = 5.0, alpha: float = 0.9, weight: float = 1.0,
                 warmup_epochs: float = 0.0):
        if not blocks:
            raise SparseforgeError("in-place depth distillation needs at least one block to skip")
        self.blocks = list(blocks)
        self.T, self.alpha, self.weight = float(T), float(alpha), float(weight)
        self.warmup_epochs = float(warmup_epochs)
        self.sub: nn.Module | None = None
        self._forward = None
        self._bn_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self.last_sub_loss = float("nan")

    def on_train_begin(self, trainer) -> None:
        self.sub = shared_subnet(trainer.model, self.blocks)
        if self._bn_state is not None:       # resumed: the sub-network's own BN statistics
            self.sub.load_state_dict({**self.sub.state_dict(), **self._bn_state})
        self.sub.train()
        self._forward = self.sub
        if getattr(trainer.config, "compile", False):
            try:
                self._forward = torch.compile(self.sub, dynamic=False)
            except Exception as e:  # pragma: no cover - depends on the toolchain
                trainer.log(f"warning: torch.compile unavailable for the sub-network ({e}); running it eagerly")

    def current_weight(self, trainer) -> float:
        """``weight``, reached linearly over the first ``warmup_epochs`` (from the trainer's step count, so a resumed
        run continues the ramp): a freshly cut sub-network's large gradients then do not disturb the shared weights
        at once."""
        if self.warmup_epochs <= 0:
            return self.weight
        ramp = self.warmup_epochs * trainer.steps_per_epoch
        return self.weight * min(1.0, trainer.step / max(1.0, ramp))

    def on_loss(self, trainer, loss, logits, x, y):
        w = self.current_weight(trainer)
        if w == 0:
            return loss
        if y.dim() != 1 and self.alpha < 1:
            raise SparseforgeError("in-place depth distillation with alpha < 1 needs hard labels; set alpha = 1 "
                                   "when a mixing regulariser turns the labels soft")
        sub_logits = self._forward(x).float()
        sub_loss = kd_loss(sub_logits, logits.detach(), T=self.T, alpha=self.alpha,
                           targets=y if self.alpha < 1 else None)
        self.last_sub_loss = float(sub_loss.detach())
        return loss + w * sub_loss

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, float]) -> None:
        rec: dict[str, Any] = {"epoch": epoch + 1, "sub_loss_last_step": self.last_sub_loss}
        if "test_acc" in metrics and trainer.test_loader is not None:
            rec["full_test_acc"] = metrics["test_acc"]
            rec["sub_test_acc"] = evaluate(self.sub, trainer.test_loader)["acc"]
        self.history.append(rec)
        if trainer.is_main and "sub_test_acc" in rec:
            trainer.log(f"  in-place: shallow sub-network test acc {rec['sub_test_acc']:.2f}% "
                        f"(full {rec['full_test_acc']:.2f}%)")

    def state_dict(self) -> dict[str, Any]:
        bufs = {} if self.sub is None else {k: v for k, v in self.sub.state_dict().items()
                                            if k in dict(self.sub.named_buffers())}
        return {"blocks": list(self.blocks), "history": self.history, "bn": bufs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if list(state.get("blocks", self.blocks)) != self.blocks:
            raise SparseforgeError("in-place depth distillation: the checkpoint skips other blocks than this run "
                                   f"({state.get('blocks')} vs {self.blocks}); resume with the same depth plan")
        self.history = list(state.get("history", []))
        self._bn_state = dict(state.get("bn", {})) or None


__all__ = ["InplaceDepthCallback", "shared_subnet"]
