"""``sparseforge demo``: the end-to-end job a new user runs first, offline, in a few minutes on 2 cores.

Train a small CNN on the synthetic data (or CIFAR-10 given a data dir), prune it with patterns +
connectivity (8x fewer weights in the 3x3 convs), fine-tune with masks, compile it, and measure the
compiled engine against PyTorch dense -- the whole product in one command.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from .recipe import Recipe, RecipeRunner
from .utils import atomic_write_json, set_threads


def _median_ms(fn, x, runs: int = 30) -> float:
    with torch.inference_mode():
        for _ in range(5):
            fn(x)
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def run_demo(data_dir: str | None = None, out: str = "runs/demo", epochs: int = 0, threads: int = 0) -> Path:
    import torch.fx.experimental.optimization as fx_opt

    from .engine import compile as sf_compile

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
    model = runner.model.eval()
    dense_acc = res["stages"][0]["eval"]["acc"]
    pruned_acc = res["final"]["acc"]
    x = torch.randn(1, 3, 32, 32)
    engine = sf_compile(model, x, threads=threads)
    from .sparsity import fold_masks

    dense = fx_opt.fuse(fold_masks(copy.deepcopy(model)).eval())
    with torch.inference_mode():
        err = float((engine(x) - model(x)).abs().max() / model(x).abs().max())
    t_dense = _median_ms(dense, x)
    t_engine = _median_ms(engine, x)
    speed = {"batch": 1, "threads": threads, "torch_dense_ms": t_dense, "engine_ms": t_engine,
             "speedup": t_dense / t_engine, "max_rel_error": err, "runs": 30}
    atomic_write_json(run_dir / "speed.json", speed)
    with open(run_dir / "report.md", "a") as f:
        f.write(f"\n## Measured latency (batch 1, {threads} threads, median of 30)\n\n"
                f"| runtime | latency |\n|---|---:|\n| PyTorch dense (BN folded) | {t_dense:.3f} ms |\n"
                f"| sparseforge engine (pattern 8x) | {t_engine:.3f} ms |\n\nSpeedup **{t_dense / t_engine:.2f}x**; "
                f"max relative difference of outputs {err:.1e}.\n\n```\n{engine.summary()}\n```\n")
    elapsed = time.perf_counter() - t0
    print(f"dense accuracy {dense_acc:.2f}% -> pattern 8x accuracy {pruned_acc:.2f}% "
          f"({res['sparsity']['compression_conv_linear']:.1f}x fewer conv/linear weights)")
    print(f"latency batch 1, {threads} threads: PyTorch dense {t_dense:.3f} ms, sparseforge {t_engine:.3f} ms "
          f"-> speedup {t_dense / t_engine:.2f}x  ({elapsed:.0f} s total)")
    print(f"report: {run_dir / 'report.md'}")
    return run_dir / "report.md"
