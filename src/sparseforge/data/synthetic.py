"""A small, procedurally generated, learnable 10-class 32x32 dataset.

For tests and the offline demo: shapes (disk, square, ring, cross, triangle,
X) and textures (horizontal/vertical/diagonal stripes, checkerboard) with
random position, size, frequency, phase and colours, plus pixel noise. Colour
carries no class information, so a model must learn spatial structure -- the
same kind of features 3x3 pattern kernels keep. Fully determined by the seed.
"""

from __future__ import annotations

import math

import torch

from .dataset import ImageDataset

CLASSES = ["disk", "square", "ring", "cross", "hstripes", "vstripes", "dstripes", "checker", "triangle", "xshape"]


def _masks(labels: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    n = labels.numel()
    ar = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy = ar.view(1, size, 1).expand(n, size, size)
    xx = ar.view(1, 1, size).expand(n, size, size)

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=g)).view(n, 1, 1)

    cx, cy, r = u(0.32, 0.68), u(0.32, 0.68), u(0.16, 0.3)
    freq, phase = u(2.5, 5.5), u(0.0, 2 * math.pi)
    dx, dy = xx - cx, yy - cy
    d = torch.sqrt(dx * dx + dy * dy)
    t = 0.07
    two_pi = 2 * math.pi
    shapes = [
        d < r,
        torch.maximum(dx.abs(), dy.abs()) < r * 0.85,
        (d - r).abs() < t,
        ((dx.abs() < t) & (dy.abs() < r)) | ((dy.abs() < t) & (dx.abs() < r)),
        torch.sin(two_pi * freq * yy + phase) > 0,
        torch.sin(two_pi * freq * xx + phase) > 0,
        torch.sin(two_pi * freq * (xx + yy) / math.sqrt(2) + phase) > 0,
        torch.sin(two_pi * freq * xx + phase) * torch.sin(two_pi * freq * yy + phase) > 0,
        (dy < r * 0.8) & (dx.abs() < (dy + r) * 0.6),
        (((dx - dy).abs() < t) | ((dx + dy).abs() < t)) & (torch.maximum(dx.abs(), dy.abs()) < r),
    ]
    out = torch.zeros(n, size, size)
    for k, m in enumerate(shapes):
        sel = labels == k
        out[sel] = m[sel].float()
    return out


def make_synthetic(n: int, seed: int = 0, size: int = 32, noise: float = 0.08, name: str = "synthetic") -> ImageDataset:
    """``n`` images, classes balanced and interleaved (row i has class i % 10)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    m = _masks(labels, size, g).unsqueeze(1)  # (n,1,H,W)
    bg = torch.rand(n, 3, 1, 1, generator=g)
    fg = torch.remainder(bg + 0.35 + 0.3 * torch.rand(n, 3, 1, 1, generator=g), 1.0)
    img = bg * (1 - m) + fg * m + noise * torch.randn(n, 3, size, size, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageDataset(images, labels, list(CLASSES), name)


def synthetic_splits(train_size: int = 10000, test_size: int = 2000, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    return (make_synthetic(train_size, seed=seed, name="synthetic-train"),
            make_synthetic(test_size, seed=seed + 1_000_003, name="synthetic-test"))
