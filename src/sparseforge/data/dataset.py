"""In-memory image datasets and a fast batch loader.

CIFAR-sized data fits in memory as one uint8 tensor (150 MB for CIFAR-10), so
instead of per-sample Python transforms and worker processes we index whole
batches and do crop+flip as one gather on uint8, then normalise in a single
fused multiply-add. Every batch's randomness is derived from (seed, epoch,
batch index), which makes the stream reproducible and lets a resumed run
skip straight to the batch it stopped at.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch

from ..errors import DataError

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # The shared pretrained CIFAR ResNets were trained with ImageNet statistics.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def normalization(name_or_stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mean, std) as tensors for a preset name or an explicit (mean, std) pair."""
    if isinstance(name_or_stats, str):
        if name_or_stats not in NORMALIZATIONS:
            raise DataError(f"unknown normalisation {name_or_stats!r}; use one of {', '.join(NORMALIZATIONS)} or (mean, std)")
        mean, std = NORMALIZATIONS[name_or_stats]
    else:
        mean, std = name_or_stats
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


@dataclasses.dataclass
class ImageDataset:
    """uint8 images (N, C, H, W) and int64 labels (N,), held in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = "dataset"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n: int) -> "ImageDataset":
        """The first ``n`` samples (class-balanced when the rows are interleaved by class)."""
        return ImageDataset(self.images[:n], self.labels[:n], self.classes, f"{self.name}[:{n}]")


def _batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 10_007 + index) % (2**63 - 1))
    return g


def augment_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and horizontal flip, on a uint8 batch, as one gather."""
    n, c, h, w = x.shape
    if pad > 0:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    rows = dy[:, None] + ar_h[None, :]  # (n, h)
    cols = torch.where(flip[:, None], dx[:, None] + (w - 1 - ar_w)[None, :], dx[:, None] + ar_w[None, :])  # (n, w)
    hp, wp = x.shape[2], x.shape[3]
    # flat index into each (hp, wp) plane, shared across channels
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return torch.gather(x.reshape(n, c, hp * wp), 2, flat).reshape(n, c, h, w)


class BatchLoader:
    """Iterate (images float32 normalised, labels) batches over an :class:`ImageDataset`.

    ``rank``/``world_size`` shard each epoch's permutation for DDP; ``start_batch``
    (set by :meth:`iterate`) skips batches already seen before a resume.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                 normalize="imagenet", seed: int = 0, drop_last: bool = False, pad: int = 4,
                 channels_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.pad = pad
        self.channels_last = channels_last
        self.rank = rank
        self.world_size = world_size
        mean, std = normalization(normalize)
        c = dataset.images.shape[1]
        if mean.numel() != c:
            raise DataError(f"normalisation has {mean.numel()} channels but {dataset.name} images have {c}")
        # x_norm = (x/255 - mean)/std = x * scale + shift, one fused op on the uint8->float batch
        self._scale = (1.0 / (255.0 * std)).view(1, c, 1, 1)
        self._shift = (-mean / std).view(1, c, 1, 1)

    def _indices(self, epoch: int) -> torch.Tensor:
        n = len(self.dataset)
        if self.shuffle:
            idx = torch.randperm(n, generator=_batch_generator(self.seed, epoch, -1))
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            per = math.ceil(n / self.world_size)
            idx = torch.cat([idx, idx[: per * self.world_size - n]])  # pad so every rank sees the same count
            idx = idx[self.rank :: self.world_size]
        return idx

    def num_batches(self) -> int:
        n = len(self._indices(0))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches()

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self._shift, x_uint8.to(torch.float32), self._scale)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def iterate(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices(epoch)
        nb = self.num_batches()
        for b in range(start_batch, nb):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.dataset.images.index_select(0, sel)
            if self.augment:
                x = augment_crop_flip(x, self.pad, _batch_generator(self.seed, epoch, b))
            yield self.normalize(x), self.dataset.labels.index_select(0, sel)

    def __iter__(self):
        return self.iterate(0)
