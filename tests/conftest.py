import os
from pathlib import Path

# Tests share 2 cores with whatever else runs: OpenMP threads that spin-wait would starve it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_DIR = SHARED / "data" / "cifar-10-batches-py"
MODELS_DIR = SHARED / "models"

# Two cores on CI: keep torch from oversubscribing when pytest runs subprocesses. Under pytest-xdist each worker
# gets its share of the cores (two workers on two cores: one thread each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


def shared_or_skip(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (needs ../shared)")
    return path


@pytest.fixture
def cifar_dir() -> Path:
    return shared_or_skip(CIFAR_DIR)


@pytest.fixture
def models_dir() -> Path:
    return shared_or_skip(MODELS_DIR)


TINY_TRAIN = {"batch_size": 16, "lr": 0.05, "schedule": "onecycle", "train_size": 64, "test_size": 32,
              "threads": 1, "max_steps_per_epoch": 2}


@pytest.fixture
def tiny_recipe():
    """``tiny_recipe(*stages, model="smallcnn", **train)``: a Recipe on synthetic data that trains in seconds
    (the preamble every recipe test shares); stages are dicts as in a [[stage]] table."""
    from sparseforge.recipe import Recipe

    def make(*stages: dict, model: str = "smallcnn", **train):
        return Recipe.from_dict({"model": model, "dataset": "synthetic", "train": {**TINY_TRAIN, **train},
                                 "stage": list(stages)})

    return make
