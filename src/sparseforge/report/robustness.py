"""Localized Lipschitz estimate (arXiv:1909.05095): forward passes only.

L(eps) = max over samples x and random directions d with ||d||_2 = eps of
||softmax f(x + d) - softmax f(x)||_2 / ||d||_2 (``on="logits"`` measures the logits instead).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..errors import SparseforgeError


def _batches(data) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
        return
    for b in data:
        yield b[0] if isinstance(b, (tuple, list)) else b


@torch.no_grad()
def lipschitz(model: nn.Module, data, eps_values=(0.01, 0.03, 0.1, 0.3, 1.0), perturbations: int = 8,
              on: str = "softmax", seed: int = 0, max_samples: int = 256) -> dict[float, float]:
    """Estimate per eps; ``data``: a tensor of inputs or an iterable of (x, y) batches."""
    if on not in ("softmax", "logits"):
        raise SparseforgeError(f"lipschitz: on must be 'softmax' or 'logits', got {on!r}")
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = {float(e): 0.0 for e in eps_values}
    seen = 0
    act = (lambda z: torch.softmax(z, 1)) if on == "softmax" else (lambda z: z)
    try:
        for x in _batches(data):
            x = x[: max_samples - seen].float()
            if not len(x):
                break
            base = act(model(x))
            for e in out:
                for _ in range(perturbations):
                    d = torch.randn(x.shape, generator=g, dtype=x.dtype)
                    d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1)) * e
                    r = (act(model(x + d)) - base).flatten(1).norm(dim=1) / e
                    out[e] = max(out[e], float(r.max()))
            seen += len(x)
            if seen >= max_samples:
                break
    finally:
        model.train(was)
    if not seen:
        raise SparseforgeError("lipschitz: no samples in data")
    return out


def plot_lipschitz(curves: dict[str, dict[float, float]], path) -> None:
    from .plots import plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, c in curves.items():
        xs = sorted(c)
        ax.plot(xs, [c[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("perturbation norm eps")
    ax.set_ylabel("local Lipschitz estimate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
