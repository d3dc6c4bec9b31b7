"""Per-layer parameters, zero fraction and FLOPs for any model.

These tables are the backbone of every report. MACs are counted from a real
forward pass (hooks attached for that pass only, then removed), so they are
right for any input size; "effective" MACs count only non-zero weights, which
is what a sparse engine can at best execute. FLOPs = 2 x MACs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn


@dataclasses.dataclass
class LayerStats:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    macs: int
    effective_macs: int
    output_shape: tuple[int, ...] = ()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sparsity"] = self.sparsity
        return d


@dataclasses.dataclass
class ModelStats:
    layers: list[LayerStats]
    total_params: int          # every parameter of the model (BN and biases included)
    total_nonzero: int
    input_shape: tuple[int, ...]

    @property
    def macs(self) -> int:
        return sum(l.macs for l in self.layers)

    @property
    def effective_macs(self) -> int:
        return sum(l.effective_macs for l in self.layers)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def sparsity(self) -> float:
        return 1.0 - self.total_nonzero / self.total_params if self.total_params else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"layers": [l.as_dict() for l in self.layers], "total_params": self.total_params,
                "total_nonzero": self.total_nonzero, "macs": self.macs, "effective_macs": self.effective_macs,
                "flops": self.flops, "sparsity": self.sparsity, "input_shape": list(self.input_shape)}

    def to_markdown(self) -> str:
        rows = ["| layer | type | weight shape | params | non-zero | sparsity | MACs | effective MACs |",
                "|---|---|---|---:|---:|---:|---:|---:|"]
        for l in self.layers:
            rows.append(f"| {l.name} | {l.kind} | {'x'.join(map(str, l.shape))} | {l.params:,} | {l.nonzero:,} | "
                        f"{100 * l.sparsity:.1f}% | {l.macs:,} | {l.effective_macs:,} |")
        rows.append(f"| **total** | | | {self.total_params:,} | {self.total_nonzero:,} | {100 * self.sparsity:.1f}% | "
                    f"{self.macs:,} | {self.effective_macs:,} |")
        return "\n".join(rows)


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight as it acts in forward: masked if a mask buffer is attached."""
    w = module.weight.detach()
    mask = getattr(module, "weight_mask", None)
    if isinstance(mask, torch.Tensor):
        w = w * mask
    return w


def model_stats(model: nn.Module, example_input: torch.Tensor | None = None, input_shape=(1, 3, 32, 32)) -> ModelStats:
    """Stats per Conv2d / Linear layer for one forward pass of ``example_input`` (batch counted as given)."""
    if example_input is None:
        example_input = torch.zeros(*input_shape)
    records: dict[str, LayerStats] = {}
    handles = []

    def hook(name: str):
        def fn(mod: nn.Module, inp, out) -> None:
            w = _effective_weight(mod)
            nz = int((w != 0).sum())
            if isinstance(mod, nn.Conv2d):
                per_out = out.shape[0] * out.shape[2] * out.shape[3]   # output positions per filter
                macs = per_out * mod.weight.numel()
                eff = per_out * nz
            else:
                rows = out.numel() // out.shape[-1]
                macs = rows * mod.weight.numel()
                eff = rows * nz
            prev = records.get(name)
            if prev is not None:  # a module called twice (weight sharing) counts twice
                prev.macs += macs
                prev.effective_macs += eff
                return
            records[name] = LayerStats(name, type(mod).__name__, tuple(mod.weight.shape), mod.weight.numel(), nz,
                                       macs, eff, tuple(out.shape))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    order = [n for n, m in model.named_modules() if n in records]
    total = sum(p.numel() for p in model.parameters())
    nonzero = 0
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if pname == "weight" and isinstance(mod, (nn.Conv2d, nn.Linear)):
                nonzero += int((_effective_weight(mod) != 0).sum())
            else:
                nonzero += int((p.detach() != 0).sum())
    return ModelStats([records[n] for n in order], total, nonzero, tuple(example_input.shape))
