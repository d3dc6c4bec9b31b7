"""A training config's data: its datasets and (DDP-sharded) loaders, built the same way by ``api.train`` and the
recipe runner."""

from __future__ import annotations

from ..data import BatchLoader, ImageDataset, load_dataset, resolve_normalization
from .config import TrainConfig


def datasets_for(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset]:
    return load_dataset(cfg.dataset, cfg.data_dir or None, synthetic_size=(cfg.train_size, cfg.test_size))


def loaders_for(cfg: TrainConfig, train: ImageDataset, test: ImageDataset, rank: int | None = None,
                world_size: int | None = None) -> tuple[BatchLoader, BatchLoader]:
    """Training loader sharded over DDP ranks (global batch = cfg.batch_size), full test loader on every rank."""
    if rank is None or world_size is None:
        from ..distributed import rank_world

        rank, world_size = rank_world()
    if cfg.batch_size % world_size:
        from ..errors import ConfigError

        raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must divide by the {world_size} "
                          "processes; pick a multiple")
    norm = resolve_normalization(cfg.dataset, cfg.normalize)
    per_rank = max(1, cfg.batch_size // world_size)
    tl = BatchLoader(train, per_rank, shuffle=True, augment=cfg.augment, normalize=norm, seed=cfg.seed,
                     drop_last=True, channels_last=cfg.channels_last, rank=rank, world_size=world_size)
    el = BatchLoader(test, 256, normalize=norm, channels_last=cfg.channels_last)
    return tl, el
