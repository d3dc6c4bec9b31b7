"""PyTorch latency of structurally pruned ResNet-56 variants vs the dense model, without training.

Architecture only (pruned from the pretrained weights; the weights' values do not change the timing), torch arms
only in the process, channels_last, BN folded, inference_mode, 2 threads, batch 32 by default. Rounds alternate
the models; each round times a block of 5 calls per model after a 50 ms pause and 2 discarded calls; speedups are
paired (ratio of block medians within a round), median and p10/p90 over rounds.

Run with a warm heap (steady state of a serving process):
  GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824 \
  python bench/structured_latency.py layer:0.45:8 layer:0.40:8 global:0.45:8      (scope:mac_ratio:round_to)
  python bench/structured_latency.py layer:0.45:8 depth:0.5 keep:5,3,5           (depth pruning)
Without it, glibc hands PyTorch's freed activation buffers back to the OS and every call page-faults them in
again; in a fresh process that made the dense ResNet-56 48 ms instead of 31 ms at batch 32 and inflated the
speedups (1.92x instead of 1.52x for the same pair). bench/structured.py times its arms in the process that ran
the recipes, whose heap is already warm, and agrees with the tuned figures.
Writes bench/results/structured_latency.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.fx.experimental.optimization as fx_opt

import sparseforge as sf
from sparseforge.models import create_model, load_weights
from sparseforge.report.env import environment
from sparseforge.structured import count_macs

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "models" / "akamaster_resnet56-4bfd9763.th"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+", help="scope:mac_ratio:round_to (channels, e.g. layer:0.45:8), "
                                                 "depth:mac_ratio (blocks dropped, e.g. depth:0.5) or keep:a,b,c "
                                                 "(blocks kept per stage, e.g. keep:5,3,5)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    base = create_model("resnet56")
    if WEIGHTS.exists():
        load_weights(base, WEIGHTS)
    base.eval()
    x1 = torch.randn(1, 3, 32, 32)
    models = {"dense": base}
    for spec in a.configs:
        if spec.startswith("depth:"):         # whole residual branches dropped (|gamma| ranking: data-free)
            cfg = sf.DepthConfig(mac_ratio=float(spec.split(":")[1]), importance="bn")
            models[spec] = sf.prune(copy.deepcopy(base), cfg, example_input=x1).eval()
            continue
        if spec.startswith("keep:"):          # keep a,b,c blocks per stage (the first of each stage and evenly
            keep = [int(v) for v in spec[5:].split(",")]     # spaced others), e.g. keep:5,3,5
            m = copy.deepcopy(base)
            for stage, k in zip((m.layer1, m.layer2, m.layer3), keep):
                n = len(stage)
                kept = {round(i * (n - 1) / max(1, k - 1)) for i in range(k)} if k > 1 else {0}
                for j in range(n):
                    if j not in kept:
                        stage[j].remove_branch()
            models[spec] = m.eval()
            continue
        scope, ratio, rt = spec.split(":")
        cfg = sf.StructuredConfig(mac_ratio=float(ratio), round_to=int(rt), scope=scope)
        models[spec] = sf.prune(copy.deepcopy(base), cfg, example_input=x1).eval()
    fns = {}
    for k, m in models.items():
        f = fx_opt.fuse(copy.deepcopy(m)).to(memory_format=torch.channels_last)
        fns[k] = (lambda f: lambda x: f(x.contiguous(memory_format=torch.channels_last)))(f)
    x = torch.randn(a.batch, 3, 32, 32)
    blocks: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for r in range(a.rounds):
            names = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]
            for k in names:
                time.sleep(0.05)
                fns[k](x)
                fns[k](x)
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    fns[k](x)
                    ts.append(time.perf_counter() - t0)
                blocks[k].append(statistics.median(ts))
    dense_macs = count_macs(base, x1)
    out = {"benchmark": "structured_latency", "batch": a.batch, "threads": a.threads, "rounds": a.rounds,
           "layout": "channels_last", "models": {}, "env": environment(),
           "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}
    for k, v in blocks.items():
        ratios = [d / s for d, s in zip(blocks["dense"], v)]
        out["models"][k] = {"mac_ratio": count_macs(models[k], x1) / dense_macs,
                            "median_ms": 1e3 * statistics.median(v),
                            "paired_speedup": {"median": statistics.median(ratios),
                                               "p10": float(np.percentile(ratios, 10)),
                                               "p90": float(np.percentile(ratios, 90))}}
        print(f"{k:16s} MACs x{out['models'][k]['mac_ratio']:.3f}  {1e3 * statistics.median(v):7.2f} ms  "
              f"paired speedup {statistics.median(ratios):.2f}")
    p = ROOT / "bench" / "results" / "structured_latency.json"
    p.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
