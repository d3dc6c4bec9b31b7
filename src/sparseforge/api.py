"""High-level Python API: what the CLI calls, usable directly from scripts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .data import BatchLoader, ImageDataset, load_dataset, resolve_normalization  # noqa: F401
from .errors import RunDirError
from .models import create_model, load_weights
from .train import Callback, TrainConfig, Trainer, evaluate
from .train.data import datasets_for, loaders_for  # noqa: F401  (public here too)
from .utils import RunLock, set_threads
from . import rundir


def config_hash(cfg: TrainConfig) -> str:
    """What the run is, not where it runs: ``device`` is left out, so a run started on a GPU resumes in the same
    default directory on the CPU (and directories named before the field existed keep their names)."""
    from .config import content_hash

    d = cfg.to_dict()
    d.pop("device", None)
    return content_hash(d)


def default_run_dir(cfg: TrainConfig, root: str | Path = "runs") -> Path:
    return Path(root) / f"train-{cfg.model}-{cfg.dataset}-{config_hash(cfg)}"


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=num_classes)
    if cfg.weights:
        load_weights(model, cfg.weights)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool) -> TrainConfig:
    """Create or reopen a run directory; never overwrite a different run without being asked. Under torchrun every
    rank branches on what rank 0 saw before it wrote (``distributed.main_rank_says``), so all ranks refuse or
    proceed together."""
    from .distributed import barrier, exists_on_main, is_main, main_rank_says

    cfg_path = run_dir / rundir.CONFIG
    if exists_on_main(cfg_path):
        saved = TrainConfig.load(cfg_path)
        if resume:
            return saved
        raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    if main_rank_says(is_main() and resume and run_dir.exists()
                      and any(p.name != RunLock.NAME for p in run_dir.iterdir())):
        raise RunDirError(f"{run_dir} has no config.toml, so it cannot be resumed; choose another --run-dir")
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(cfg_path)
    barrier()
    return cfg


def train(cfg: TrainConfig, run_dir: str | Path | None = None, resume: bool = False,
          callbacks: Iterable[Callback] = (), progress: bool | None = None,
          log: Callable[[str], None] | None = None, announce: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train per ``cfg``; returns (model, last metrics). With ``resume`` the run dir's saved config wins, except for
    ``device``: where the run continues is the caller's choice (a GPU-started run resumes on a CPU machine).
    The run directory is locked for the call: a second process on it fails at once (``RunDirError``)."""
    import dataclasses

    from .distributed import is_main
    from .utils import resolve_device

    resolve_device(cfg.device)      # an unusable device fails here, before a run directory exists to block a retry
    lock = RunLock(run_dir) if run_dir is not None and is_main() else None
    if lock is not None:
        lock.acquire()              # a second process on the same run directory fails here, at once
    fresh = lock is not None and not (Path(run_dir) / rundir.CONFIG).exists()    # rank 0 only: it cleans up
    try:
        if run_dir is not None:
            cfg = dataclasses.replace(prepare_run_dir(Path(run_dir), cfg, resume), device=cfg.device)
        set_threads(cfg.threads)
        train_ds, test_ds = datasets_for(cfg)
        model = build_model(cfg, train_ds.num_classes)
        tl, el = loaders_for(cfg, train_ds, test_ds)
        trainer = Trainer(model, cfg, tl, el, callbacks=callbacks, run_dir=run_dir, progress=progress, log=log)
        trainer.announce = announce     # "run directory: ..." once the checks passed (a refused run prints one line)
        result = trainer.fit(resume=resume)
        return model, result
    except BaseException:
        # a run that failed before its first checkpoint (bad weights, a batch larger than the data, ...) leaves no
        # config behind: fixing the input and running the same command again must just work
        if fresh and lock is not None and not any((Path(run_dir) / rundir.CHECKPOINTS).glob("*")):
            (Path(run_dir) / rundir.CONFIG).unlink(missing_ok=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def evaluate_model(model_name: str, weights: str | Path | None, dataset: str = "cifar10", data_dir: str | None = None,
                   normalize: str = "auto", batch_size: int = 256, limit: int = 0, threads: int = 0,
                   model: nn.Module | None = None) -> dict[str, float]:
    """Test accuracy of a model + weights on a dataset's test split (``model``: already built and loaded)."""
    set_threads(threads)
    _, test = load_dataset(dataset, data_dir)
    if limit:
        test = test.subset(limit)
    if model is None:
        model = create_model(model_name, num_classes=test.num_classes)
        if weights:
            load_weights(model, weights)
    norm = resolve_normalization(dataset, normalize)
    return evaluate(model, BatchLoader(test, batch_size, normalize=norm))


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
