"""Compile time (pattern 8x): cold (empty cache) and from cache. Writes bench/results/compile_time.json
(ResNet-56 at 32x32), or compile_time_<model>_<size>.json for other models / sizes.

Run: python bench/compile_time.py [--model resnet56] [--size 32] [--reps 3]
     python bench/compile_time.py --model resnet50 --size 224      # issue 22: < 30 s cold, < 1 s cached
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sparseforge as sf
from sparseforge.report.env import environment

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=32, help="input height and width")
    a = ap.parse_args()
    m = sf.create_model(a.model).eval()
    sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=3.6))
    x = torch.randn(1, 3, a.size, a.size)
    cold, warm, stages = [], [], []
    for _ in range(a.reps):
        os.environ["SPARSEFORGE_CACHE"] = tempfile.mkdtemp(prefix="sf-ct-")
        t0 = time.perf_counter()
        _, st = sf.compile(m, x, threads=2, return_stages=True)
        cold.append(time.perf_counter() - t0)
        stages.append(st.seconds)
        t0 = time.perf_counter()
        e2 = sf.compile(m, x, threads=2)       # what a user's second compile does (plan and library from cache)
        warm.append(time.perf_counter() - t0)
        assert e2.spec["build"]["plan_cached"] and e2.spec["build"]["cached"]
    doc = {"benchmark": "compile_time", "model": a.model, "size": a.size, "sparsity": "pattern 8x", "cold_s": cold, "cached_s": warm,
           "cold_median_s": statistics.median(cold), "cached_median_s": statistics.median(warm),
           "stage_seconds_cold": stages, "env": environment()}
    name = "compile_time.json" if (a.model, a.size) == ("resnet56", 32) else f"compile_time_{a.model}_{a.size}.json"
    out = ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"{a.model}: cold {doc['cold_median_s']:.2f} s, cached {doc['cached_median_s']:.2f} s (median of {a.reps})")


if __name__ == "__main__":
    main()
