"""Low precision: power-of-two weights (SmartDeal) and progressive fractional precision (FracTrain PFQ).

Both replace ``nn.Conv2d`` by a subclass whose forward computes the effective weight (no hooks, no
parametrizations: models deep-copy, pickle and save as before); ``fold_lowbit`` turns them back into plain
convs holding the reconstructed / quantised weights for inference and the compiler.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, ConfigError, opt
from .errors import SparseforgeError
from .masks import MASK_BUFFER
from .sparsity.scope import first_conv_name
from .train.loop import Callback

# ---- power-of-two weights ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pow2Config(Config):
    """W_oi = C_oi @ B per kernel slice: B a dense kh x kh basis per layer, C rounded to sign * 2^k."""

    k_min: int = opt(-8, "smallest exponent of a non-zero coefficient")
    k_max: int = opt(0, "largest exponent")
    delta: float = opt(4e-3, "coefficients with |c| below this are 0", min=0.0)
    prune_first_conv: bool = opt(False, "also decompose the first conv")
    epochs: int = opt(3, "recipe stage: epochs of training the decomposition (then folded to plain convs)", min=1)

    def validate(self) -> None:
        if self.k_min > self.k_max:
            raise ConfigError(f"Pow2Config: k_min ({self.k_min}) must be <= k_max ({self.k_max})")


def pow2_round(c: torch.Tensor, k_min: int, k_max: int, delta: float) -> torch.Tensor:
    """sign(c) * 2^clip(round(log2|c|), k_min, k_max); |c| < delta -> 0."""
    a = c.abs()
    k = torch.log2(a.clamp_min(1e-30)).round().clamp(k_min, k_max)
    return torch.where(a < delta, torch.zeros_like(c), torch.sign(c) * torch.pow(2.0, k))


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, k_min, k_max, delta):
        return pow2_round(c, k_min, k_max, delta)

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None


class Pow2Conv2d(nn.Conv2d):
    """A conv whose weight is (pow2(C) @ B) (times its mask, if pattern-pruned). Trains C and B (STE on C)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, cfg: Pow2Config) -> "Pow2Conv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode)
        kh, kw = conv.kernel_size
        w = conv.weight.detach().reshape(-1, kh, kw)             # slices (O*I, kh, kw)
        # basis from the SVD of the stacked slices' rows: C @ B reproduces W exactly before rounding
        rows = w.reshape(-1, kw)
        _, s, vt = torch.linalg.svd(rows, full_matrices=False)
        scale = (s[0] / math.sqrt(rows.shape[0])).clamp_min(1e-12)
        basis = vt * scale                                         # (kw, kw), rows of norm `scale`
        coeff = w @ torch.linalg.pinv(basis)                       # (O*I, kh, kw)
        del new.weight
        new.coeff = nn.Parameter(coeff.contiguous())
        new.basis = nn.Parameter(basis.contiguous())
        new.cfg = cfg
        if conv.bias is not None:
            new.bias = nn.Parameter(conv.bias.detach().clone())
        m = getattr(conv, MASK_BUFFER, None)
        if isinstance(m, torch.Tensor):
            new.register_buffer(MASK_BUFFER, m.clone())
        return new

    def quantized_coeff(self) -> torch.Tensor:
        return pow2_round(self.coeff.detach(), self.cfg.k_min, self.cfg.k_max, self.cfg.delta)

    def effective_weight(self) -> torch.Tensor:
        c = _STE.apply(self.coeff, self.cfg.k_min, self.cfg.k_max, self.cfg.delta)
        w = (c @ self.basis).reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        m = getattr(self, MASK_BUFFER, None)
        return w * m if isinstance(m, torch.Tensor) else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 even under TrainConfig.precision='bf16': bf16 would round C @ B away from the power-of-two grid
        # that the stage's storage accounting and fold assume
        with torch.autocast(x.device.type, enabled=False):
            return self._conv_forward(x.float(), self.effective_weight(), self.bias)

    def storage_bits(self) -> dict[str, int]:
        c = self.quantized_coeff()
        e_bits = max(1, math.ceil(math.log2(self.cfg.k_max - self.cfg.k_min + 1)))
        nnz = int((c != 0).sum())
        dense = 32 * self.out_channels * (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        # sign + exponent per non-zero, a 1-bit occupancy map over all coefficients, fp32 basis
        return {"fp32": dense, "pow2": nnz * (1 + e_bits) + c.numel() + 32 * self.basis.numel()}


def apply_pow2(model: nn.Module, cfg: Pow2Config) -> nn.Module:
    """Replace every 3x3 (non-depthwise) conv, except the first unless asked, by a Pow2Conv2d (in place)."""
    first = first_conv_name(model)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.groups == 1 and (name != first or cfg.prune_first_conv):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], Pow2Conv2d.from_conv(m, cfg))
    return model


def pow2_storage(model: nn.Module) -> dict[str, int]:
    tot = {"fp32": 0, "pow2": 0}
    for m in model.modules():
        if isinstance(m, Pow2Conv2d):
            for k, v in m.storage_bits().items():
                tot[k] += v
    return tot


# ---- progressive fractional precision ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProgressivePrecisionConfig(Config):
    """Fake-quantise weights, activations and gradients; raise the precision when the loss plateaus."""

    forward_bits: tuple[int, ...] = opt((3, 4, 6, 8), "weight/activation bits, stage by stage")
    grad_bits: tuple[int, ...] = opt((6, 6, 8, 8), "gradient bits, stage by stage")
    period: int = opt(400, "iterations per period", min=1)
    window: int = opt(5, "periods compared for the plateau rule", min=2)
    epsilon: float = opt(0.1, "advance when the last `window` periods' loss range < epsilon x the first period's loss",
                         min=0.0)
    epochs: int = opt(3, "recipe stage: epochs", min=1)

    def validate(self) -> None:
        if len(self.forward_bits) != len(self.grad_bits) or not self.forward_bits:
            raise ConfigError("ProgressivePrecisionConfig: forward_bits and grad_bits need the same, non-zero length")
        if any(not 1 <= b <= 16 for b in (*self.forward_bits, *self.grad_bits)):
            raise ConfigError("ProgressivePrecisionConfig: bits must be in 1..16")


def fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform min-max quantisation to exactly 2**bits levels (forward only; no gradient rule)."""
    lo, hi = x.min(), x.max()
    if float(hi - lo) == 0.0:
        return x.clone()
    n = 2 ** bits - 1
    s = (hi - lo) / n
    return torch.round((x - lo) / s).clamp(0, n) * s + lo


class _FQ(torch.autograd.Function):
    """Fake-quantise in forward (STE) and the incoming gradient to ``gbits`` in backward."""

    @staticmethod
    def forward(ctx, x, bits, gbits):
        ctx.gbits = gbits
        return fake_quant(x, bits) if bits < 32 else x

    @staticmethod
    def backward(ctx, g):
        return (fake_quant(g, ctx.gbits) if ctx.gbits < 32 else g), None, None


class FQConv2d(nn.Conv2d):
    """Conv with fake-quantised input activation and weight (bits in ``self.bits``), gradients quantised to
    ``self.gbits`` on the way back."""

    bits = 32
    gbits = 32

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FQConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode)
        new.load_state_dict(conv.state_dict(), strict=False)
        m = getattr(conv, MASK_BUFFER, None)
        if isinstance(m, torch.Tensor):
            new.register_buffer(MASK_BUFFER, m.clone())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 even under TrainConfig.precision='bf16': the simulated b-bit grid (up to 2^8 levels with an offset)
        # is not representable in bf16's 8 significant bits, so autocast would add levels the bit-op count ignores
        with torch.autocast(x.device.type, enabled=False):
            x = _FQ.apply(x.float(), self.bits, self.gbits)
            w = _FQ.apply(self.weight, self.bits, self.gbits)
            return self._conv_forward(x, w, self.bias)


def apply_fake_quant(model: nn.Module) -> nn.Module:
    for name, m in list(model.named_modules()):
        if type(m) is nn.Conv2d:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], FQConv2d.from_conv(m))
    return model


def set_bits(model: nn.Module, bits: int, gbits: int) -> None:
    for m in model.modules():
        if isinstance(m, FQConv2d):
            m.bits, m.gbits = bits, gbits


def plateaued(period_losses: list[float], window: int, epsilon: float, scale: float) -> bool:
    """The loss over the last ``window`` periods moved less than ``epsilon * scale``."""
    if len(period_losses) < window:
        return False
    last = period_losses[-window:]
    return (max(last) - min(last)) < epsilon * scale


class ProgressivePrecisionCallback(Callback):
    """Tracks mean loss per period; advances the bit stage when it plateaus; counts bit-operations."""

    def __init__(self, cfg: ProgressivePrecisionConfig, macs_per_image: int):
        self.cfg = cfg
        self.macs = macs_per_image
        self.stage = 0
        self.periods: list[float] = []      # losses of the current stage's periods
        self.scale: float | None = None     # the first period's loss (the "initial loss scale")
        self._acc, self._n = 0.0, 0
        self.bitops = 0.0                   # MACs x bits, forward (w x a) + 2 backward passes (g x a, g x w)
        self.bitops_8bit = 0.0
        self.switches: list[int] = []

    def on_train_begin(self, trainer) -> None:
        set_bits(trainer.model, self.cfg.forward_bits[self.stage], self.cfg.grad_bits[self.stage])

    def on_loss(self, trainer, loss, logits, x, y):
        b, g = self.cfg.forward_bits[self.stage], self.cfg.grad_bits[self.stage]
        n = x.shape[0] * self.macs
        self.bitops += n * (b * b + 2 * g * b)
        self.bitops_8bit += n * (8 * 8 + 2 * 8 * 8)
        self._acc += float(loss.detach())
        self._n += 1
        return loss

    def on_step_end(self, trainer) -> None:
        if self._n < self.cfg.period:
            return
        self.observe(self._acc / self._n, trainer)
        self._acc, self._n = 0.0, 0

    def observe(self, period_loss: float, trainer=None) -> bool:
        """Feed one period's mean loss; returns True when the precision stage advanced."""
        if self.scale is None:
            self.scale = period_loss
        self.periods.append(period_loss)
        if self.stage + 1 < len(self.cfg.forward_bits) and plateaued(self.periods, self.cfg.window, self.cfg.epsilon,
                                                                     self.scale):
            self.stage += 1
            self.periods = []
            self.switches.append(getattr(trainer, "step", -1))
            if trainer is not None:
                set_bits(trainer.model, self.cfg.forward_bits[self.stage], self.cfg.grad_bits[self.stage])
            return True
        return False

    def saved(self) -> float:
        return 1 - self.bitops / self.bitops_8bit if self.bitops_8bit else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("stage", "periods", "scale", "bitops", "bitops_8bit", "switches")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def fold_lowbit(model: nn.Module) -> nn.Module:
    """Plain convs holding the reconstructed (pow2) or final-precision (fake-quant) weights, for inference."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Pow2Conv2d | FQConv2d):
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                             m.bias is not None, m.padding_mode)
            with torch.no_grad():
                if isinstance(m, Pow2Conv2d):
                    conv.weight.copy_(m.effective_weight())
                else:
                    conv.weight.copy_(fake_quant(m.weight, m.bits) if m.bits < 32 else m.weight)
                if m.bias is not None:
                    conv.bias.copy_(m.bias)
            mk = getattr(m, MASK_BUFFER, None)
            if isinstance(mk, torch.Tensor):
                conv.register_buffer(MASK_BUFFER, mk.clone())
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], conv)
    return model


__all__ = ["Pow2Config", "Pow2Conv2d", "pow2_round", "apply_pow2", "pow2_storage", "ProgressivePrecisionConfig",
           "fake_quant", "FQConv2d", "apply_fake_quant", "set_bits", "plateaued", "ProgressivePrecisionCallback",
           "fold_lowbit", "SparseforgeError", "F"]
