"""What the accuracy benches share: one arm = a recipe on the shared ResNet-20 start and CIFAR-10 copy, run (or
resumed) in its own directory."""

from __future__ import annotations

from pathlib import Path

from sparseforge.recipe import Recipe, RecipeRunner

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESNET20 = SHARED / "models" / "resnet20-cifar10jpeg.safetensors"
TRAIN = {"batch_size": 128, "lr": 0.01, "schedule": "cosine", "weight_decay": 1e-4, "threads": 2}


def run_resnet20_arm(stages: list[dict], run_dir: Path, data_dir: str, **train) -> dict:
    """Run ``stages`` from the shared ResNet-20 (88.46% on this data) with TRAIN (+ ``train``); resumes a killed
    arm from its directory. Returns the runner's results."""
    rc = Recipe.from_dict({"model": "resnet20", "weights": str(RESNET20), "dataset": "cifar10", "data_dir": data_dir,
                           "train": {**TRAIN, **train}, "stage": stages})
    return RecipeRunner(rc, run_dir, progress=False).run(resume=(run_dir / "recipe.toml").exists())
