"""The engine vs onnxruntime fp32 when another process streams memory: each runtime on one thread pinned to cpu 0,
a process copying two 64 MB arrays back and forth (past any L3) pinned to cpu 1, phases with and without it
alternating (quiet, streaming, quiet, streaming), the arms alternating within each phase.

Why: on shared hosts the engine lost more than onnxruntime in noisy periods (session 43: ResNet-18 6.22 vs 4.77 ms,
onnxruntime 17.7 vs 17.4). A sparse layer moves more bytes per FLOP than a dense GEMM, so memory that another
tenant keeps busy costs it more; this measures how much, per model (Linux, 2+ CPUs):
  python bench/memory_contention.py --models resnet18:pattern8x,vgg16_bn:pattern8x+fc
Writes bench/results/memory_contention.json and .png (median latency per arm and phase).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import sparseforge as sf
from sparseforge.report.env import environment
from sparseforge.report.latency import onnxruntime_session
from sparseforge.report.plots import plt  # Agg backend
from sparseforge.utils import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import CONFIGS, FC_8X, model_for  # noqa: E402  (bench/ is on sys.path when this script runs)

ROOT = Path(__file__).resolve().parents[1]
STREAM = ("import numpy as np\na = np.ones(16 << 20, np.float32); b = np.empty_like(a)\n"
          "while True:\n    np.copyto(b, a); np.copyto(a, b)\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18:pattern8x,vgg16_bn:pattern8x+fc")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=15, help="runs per arm and phase")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_contention"))
    a = ap.parse_args()
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        sys.exit("memory_contention.py needs Linux and at least 2 CPUs (one per side)")
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    torch.set_num_threads(1)
    results = []
    for spec in a.models.split(","):
        name, cfg = spec.split(":")
        m = model_for(name)
        sf.prune(m, CONFIGS[cfg])
        if cfg.endswith("+fc"):
            sf.prune(m, FC_8X)
        x = torch.randn(1, 3, a.size, a.size)
        engine = sf.compile(m, x, threads=1)
        sess = onnxruntime_session(model_for(name), x, 1)
        if sess is None:
            sys.exit("onnxruntime is not installed: pip install -e '.[bench]'")
        feed = {sess.get_inputs()[0].name: x.numpy()}
        arms = {"sparseforge": lambda: engine(x), "onnxruntime-dense": lambda: sess.run(None, feed)}
        for f in arms.values():
            for _ in range(3):
                f()
        phases: dict[str, dict[str, list[float]]] = {}
        for phase in ("quiet", "streaming", "quiet", "streaming"):
            stream = None
            if phase == "streaming":
                stream = subprocess.Popen([sys.executable, "-c", STREAM])
                os.sched_setaffinity(stream.pid, {cpus[1]})
                time.sleep(1.5)             # started, its arrays allocated and streaming
            try:
                for r in range(a.runs):
                    for k in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                        t0 = time.perf_counter()
                        arms[k]()
                        phases.setdefault(phase, {}).setdefault(k, []).append(1e3 * (time.perf_counter() - t0))
            finally:
                if stream is not None:
                    stream.kill()
                    stream.wait()
        med = {ph: {k: statistics.median(v) for k, v in d.items()} for ph, d in phases.items()}
        row = {"model": name, "config": cfg, "size": a.size, "threads": 1, "median_ms": med,
               "slowdown": {k: med["streaming"][k] / med["quiet"][k] for k in arms},
               "speedup_vs_onnxruntime": {ph: med[ph]["onnxruntime-dense"] / med[ph]["sparseforge"] for ph in med}}
        results.append(row)
        print(f"{spec}: streaming beside it, sparseforge {row['slowdown']['sparseforge']:.2f}x slower, onnxruntime "
              f"{row['slowdown']['onnxruntime-dense']:.2f}x; speedup {row['speedup_vs_onnxruntime']['quiet']:.2f}x "
              f"quiet, {row['speedup_vs_onnxruntime']['streaming']:.2f}x streaming", flush=True)
    doc = {"benchmark": "memory_contention", "method": "one thread per runtime on one CPU, a process streaming 2 x "
           "64 MB arrays on another; phases quiet/streaming/quiet/streaming, arms alternating, median per arm",
           "results": results, "env": environment()}
    out = Path(a.out)
    atomic_write_json(out.with_suffix(".json"), doc)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, w = [f"{r['model']}\n{r['config']}" for r in results], 0.2
    for i, (arm, ph) in enumerate([(arm, ph) for arm in ("sparseforge", "onnxruntime-dense")
                                   for ph in ("quiet", "streaming")]):
        ax.bar([j + (i - 1.5) * w for j in range(len(results))], [r["median_ms"][ph][arm] for r in results], w,
               label=f"{arm}, {ph}")
    ax.set_xticks(range(len(results)), labels)
    ax.set_ylabel("ms, batch 1, 1 thread")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
