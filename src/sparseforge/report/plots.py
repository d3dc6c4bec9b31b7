"""Plots for reports (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_pattern_library(library: torch.Tensor, counts: Sequence[int] | None, path: Path, title: str = "") -> Path:
    """The k patterns as 3x3 tiles, each labelled with its share of best fits."""
    k = library.shape[0]
    total = float(sum(counts)) if counts is not None and sum(counts) else 0.0
    fig, axes = plt.subplots(1, k, figsize=(1.3 * k, 1.9), squeeze=False)
    for i in range(k):
        ax = axes[0][i]
        ax.imshow(library[i].reshape(3, 3).numpy(), cmap="Greys", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        for x in range(4):
            ax.axhline(x - 0.5, color="#999", lw=0.5), ax.axvline(x - 0.5, color="#999", lw=0.5)
        label = f"#{i + 1}"
        if total:
            label += f"\n{100 * counts[i] / total:.1f}%"
        ax.set_title(label, fontsize=8)
    fig.suptitle(title or f"pattern library (k={k}; % = share of best fits among counted kernels)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_sparsity(names: Sequence[str], densities: Sequence[float], path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.2))
    ax.bar(range(len(names)), [100 * (1 - d) for d in densities], color="#3b6ea8")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("weights removed (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "sparsity per layer", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, xlabel: str, ylabel: str,
                title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
