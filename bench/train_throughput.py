"""Training throughput of ResNet-20 (fp32, batch 128) with and without channels_last / torch.compile,
and the loader's own images/s, so we know the loader is not the bottleneck.

Run: python bench/train_throughput.py [--threads 2] [--steps 12] [--compile]
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from sparseforge.data import BatchLoader, make_synthetic
from sparseforge.models import create_model
from sparseforge.report.env import environment


def time_training(channels_last: bool, compile_: bool, steps: int, warmup: int, batch: int, data) -> list[float]:
    torch.manual_seed(0)
    model = create_model("resnet20")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = BatchLoader(data, batch, shuffle=True, augment=True, channels_last=channels_last, drop_last=True)
    model.train()
    times = []
    it = loader.iterate(0)
    for i in range(warmup + steps):
        x, y = next(it)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(batch / dt)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--out", default="bench/results/train_throughput.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = make_synthetic(a.batch * (a.steps + a.warmup + 2), seed=0)

    # loader alone: full epoch of crop+flip+normalise
    loader = BatchLoader(data, a.batch, shuffle=True, augment=True)
    t0 = time.perf_counter()
    n = sum(x.shape[0] for x, _ in loader.iterate(0))
    loader_ips = n / (time.perf_counter() - t0)

    arms = [("nchw", False, False), ("channels_last", True, False)]
    if a.compile:
        arms += [("nchw+compile", False, True), ("channels_last+compile", True, True)]
    results = {}
    for name, cl, comp in arms:
        try:
            ips = time_training(cl, comp, a.steps, a.warmup + (2 if comp else 0), a.batch, data)
            results[name] = {"median_images_per_s": statistics.median(ips), "min": min(ips), "max": max(ips), "runs": len(ips)}
        except Exception as e:  # torch.compile needs a working C++ toolchain
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"{name:24s} {results[name]}")
    print(f"{'loader (crop+flip+norm)':24s} {loader_ips:.0f} images/s")
    out = {"benchmark": "train_throughput", "model": "resnet20", "batch": a.batch, "threads": a.threads,
           "dtype": "float32", "loader_images_per_s": loader_ips, "arms": results, "env": environment()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
