"""``sparseforge demo``: the end-to-end job a new user runs first, offline, in a few minutes on 2 cores.

Train a small CNN on the synthetic data (or CIFAR-10 given a data dir), prune it with patterns +
connectivity (8x fewer weights in the 3x3 convs), fine-tune with masks, compile it, and measure the
compiled engine against PyTorch dense -- the whole product in one command.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .recipe import Recipe, RecipeRunner
from .utils import set_threads
from . import rundir


def run_demo(data_dir: str | None = None, out: str = "runs/demo", epochs: int = 0, threads: int = 0) -> Path:
    t0 = time.perf_counter()
    threads = set_threads(threads or min(2, torch.get_num_threads()))
    dense_epochs = epochs or (3 if not data_dir else 1)
    data = ({"dataset": "cifar10", "data_dir": data_dir} if data_dir else {"dataset": "synthetic"})
    train = {"batch_size": 128, "lr": 0.05, "schedule": "onecycle", "threads": threads, "train_size": 8000,
             "test_size": 2000, "channels_last": False}
    if data_dir:
        train["max_steps_per_epoch"] = 100
    recipe = Recipe.from_dict({"model": "smallcnn", **data, "train": train, "stage": [
        {"method": "finetune", "epochs": dense_epochs},
        {"method": "pattern", "num_patterns": 8, "connectivity": "3.6x"},
        {"method": "finetune", "epochs": max(1, dense_epochs - 1)},
        {"method": "compile", "batches": [1], "runs": 30},
    ]})
    root = Path(out)
    run_dir = root / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while run_dir.exists():  # never reuse a directory
        run_dir = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    print(f"sparseforge demo: smallcnn on {recipe.dataset}: train -> pattern prune 8x -> fine-tune -> compile -> bench"
          f"\n  run directory: {run_dir}", file=sys.stderr)
    runner = RecipeRunner(recipe, run_dir)
    res = runner.run()
    dense_acc = res["stages"][0]["eval"]["acc"]
    pruned_acc = res["final"]["acc"]
    comp = res["stages"][-1]
    lat = comp["latency"]["1"]
    t_dense, t_engine = lat["torch-dense"]["median_ms"], lat["sparseforge"]["median_ms"]
    elapsed = time.perf_counter() - t0
    print(f"dense accuracy {dense_acc:.2f}% -> pattern 8x accuracy {pruned_acc:.2f}% "
          f"({res['sparsity']['compression_conv_linear']:.1f}x fewer conv/linear weights)")
    extra = (f", onnxruntime dense {lat['onnxruntime-dense']['median_ms']:.3f} ms"
             if "onnxruntime-dense" in lat else "")
    print(f"latency batch 1, {comp['threads']} threads (median of {lat['sparseforge']['runs']}): PyTorch dense "
          f"{t_dense:.3f} ms{extra}, sparseforge {t_engine:.3f} ms -> speedup {t_dense / t_engine:.2f}x vs PyTorch "
          f"({elapsed:.0f} s total)")
    print(f"report: {run_dir / 'report.html'}")
    return run_dir / rundir.REPORT_HTML
