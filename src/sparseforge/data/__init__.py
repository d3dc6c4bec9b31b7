"""Datasets: CIFAR readers, the synthetic set, and the fast batch loader."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .cifar import download_cifar, load_cifar
from .dataset import NORMALIZATIONS, BatchLoader, ImageDataset, augment_crop_flip, normalization
from .synthetic import make_synthetic, synthetic_splits

DATASETS = ("synthetic", "cifar10", "cifar100")


def resolve_normalization(dataset: str, normalize: str) -> str:
    """``auto`` picks imagenet statistics for CIFAR (the shared pretrained weights expect them) and 0.5/0.5 for synthetic."""
    if normalize != "auto":
        return normalize
    return "half" if dataset == "synthetic" else "imagenet"


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False,
                 synthetic_size: tuple[int, int] = (10000, 2000), seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Return (train, test) for a dataset name."""
    if name == "synthetic":
        return synthetic_splits(*synthetic_size, seed=seed)
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DataError(f"{name} needs --data-dir (the extracted python-batch directory); or use dataset 'synthetic' offline")
        return (load_cifar(name, data_dir, "train", download=download), load_cifar(name, data_dir, "test", download=download))
    raise DataError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")


__all__ = ["BatchLoader", "ImageDataset", "load_cifar", "download_cifar", "make_synthetic", "synthetic_splits",
           "load_dataset", "resolve_normalization", "normalization", "NORMALIZATIONS", "augment_crop_flip", "DATASETS"]
