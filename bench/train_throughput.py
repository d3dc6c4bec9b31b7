"""Training throughput (batch 128) with and without channels_last / bf16 autocast / torch.compile, and the
loader's own images/s, so we know the loader is not the bottleneck.

bf16 (``TrainConfig.precision='bf16'``) autocasts the forward as the Trainer does; weights and the optimizer stay
fp32. It pays only on CPUs with AMX or AVX512-BF16 (the JSON records the CPU flags).

Run: python bench/train_throughput.py [--model resnet56] [--threads 2] [--steps 12] [--compile]
Writes bench/results/train_throughput[-MODEL].json and a bar plot next to it.
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


def time_training(channels_last: bool, compile_: bool, steps: int, warmup: int, batch: int, data,
                  model_name: str = "resnet20", bf16: bool = False) -> list[float]:
    torch.manual_seed(0)
    model = create_model(model_name)
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(fwd(x).float(), y)
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
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = make_synthetic(a.batch * (a.steps + a.warmup + 2), seed=0)

    # loader alone: full epoch of crop+flip+normalise
    loader = BatchLoader(data, a.batch, shuffle=True, augment=True)
    t0 = time.perf_counter()
    n = sum(x.shape[0] for x, _ in loader.iterate(0))
    loader_ips = n / (time.perf_counter() - t0)

    arms = [("nchw", False, False, False), ("channels_last", True, False, False),
            ("nchw+bf16", False, False, True), ("channels_last+bf16", True, False, True)]
    if a.compile:
        arms += [("nchw+compile", False, True, False), ("channels_last+compile", True, True, False),
                 ("nchw+bf16+compile", False, True, True), ("channels_last+bf16+compile", True, True, True)]
    results = {}
    for name, cl, comp, bf16 in arms:
        try:
            ips = time_training(cl, comp, a.steps, a.warmup + (2 if comp else 0), a.batch, data, a.model, bf16)
            results[name] = {"median_images_per_s": statistics.median(ips), "min": min(ips), "max": max(ips), "runs": len(ips)}
        except Exception as e:  # torch.compile needs a working C++ toolchain
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"{name:24s} {results[name]}")
    print(f"{'loader (crop+flip+norm)':24s} {loader_ips:.0f} images/s")
    out = {"benchmark": "train_throughput", "model": a.model, "batch": a.batch, "threads": a.threads,
           "metric": "images/s per training step (forward, backward, SGD step), median over steps",
           "loader_images_per_s": loader_ips, "arms": results, "env": environment()}
    path = Path(a.out or f"bench/results/train_throughput{'' if a.model == 'resnet20' else '-' + a.model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in results.items() if "median_images_per_s" in v}
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(ok), [v["median_images_per_s"] for v in ok.values()],
            xerr=[[v["median_images_per_s"] - v["min"] for v in ok.values()],
                  [v["max"] - v["median_images_per_s"] for v in ok.values()]], color="tab:blue")
    ax.set_xlabel("training images/s (median, min-max)")
    ax.set_title(f"{a.model} training, batch {a.batch}, {a.threads} threads")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
