"""``sparseforge demo``: the end-to-end job a new user runs first, offline.

Today: train a small CNN on the synthetic data (or CIFAR-10 with a data dir),
evaluate it, and write a run directory with metrics and a per-layer report.
Pruning and compilation stages join as those capabilities land.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .api import train
from .report.stats import model_stats
from .train import TrainConfig
from .utils import atomic_write_text


def run_demo(data_dir: str | None = None, out: str = "runs/demo", epochs: int = 0, threads: int = 0) -> Path:
    t0 = time.perf_counter()
    if data_dir:
        cfg = TrainConfig(model="smallcnn", dataset="cifar10", data_dir=data_dir, epochs=epochs or 1, lr=0.05,
                          batch_size=128, schedule="onecycle", threads=threads)
    else:
        cfg = TrainConfig(model="smallcnn", dataset="synthetic", epochs=epochs or 4, lr=0.05, batch_size=128,
                          schedule="onecycle", threads=threads, train_size=8000, test_size=2000)
    root = Path(out)
    run_dir = root / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while run_dir.exists():  # never reuse a directory
        run_dir = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    print(f"sparseforge demo: training {cfg.model} on {cfg.dataset} for {cfg.epochs} epoch(s) -> {run_dir}", file=sys.stderr)
    model, result = train(cfg, run_dir)
    st = model_stats(model, torch.zeros(1, 3, 32, 32))
    elapsed = time.perf_counter() - t0
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join([
        f"# sparseforge demo: {cfg.model} on {cfg.dataset}",
        "",
        f"- test accuracy: **{result.get('test_acc', float('nan')):.2f}%** after {cfg.epochs} epoch(s)",
        f"- parameters: {st.total_params:,}; MACs per image: {st.macs:,} (FLOPs {st.flops:,})",
        f"- wall time: {elapsed:.1f} s, {torch.get_num_threads()} threads",
        "",
        "## Layers",
        "",
        st.to_markdown(),
        "",
    ]))
    print(f"test accuracy {result.get('test_acc', float('nan')):.2f}%  params {st.total_params:,}  "
          f"MFLOPs {st.flops / 1e6:.1f}  ({elapsed:.0f} s)")
    print(f"report: {report}")
    return report
