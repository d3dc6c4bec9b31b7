import os
from pathlib import Path

# Tests share 2 cores with whatever else runs: OpenMP threads that spin-wait would starve it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_DIR = SHARED / "data" / "cifar-10-batches-py"
MODELS_DIR = SHARED / "models"

# Two cores on CI: keep torch from oversubscribing when pytest runs subprocesses.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
