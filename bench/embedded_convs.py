"""Dilated and non-square convs: the engine's embedded kernels vs PyTorch (oneDNN: what the engine falls back to)
and onnxruntime fp32, one conv + BatchNorm + ReLU at a time, batch 1, the arms alternating in one process.

Why: the engine runs these convs in a square kernel whose other taps are structural zeros (trace.embed_conv) when
they are sparse enough (PlanOptions.embed_max_density); this measures where that pays, dense to pattern 8x, and
is what that default was set from (every conv is forced native here, whatever its density):
  python bench/embedded_convs.py --threads 2
Writes bench/results/embedded_convs.json and .png (speedup of the engine over each arm per conv and sparsity).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.engine.plan import PlanOptions
from sparseforge.report.env import environment
from sparseforge.report.latency import onnxruntime_session
from sparseforge.report.plots import plt  # Agg backend
from sparseforge.utils import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import P8  # noqa: E402  (bench/ is on sys.path when this script runs)

ROOT = Path(__file__).resolve().parents[1]
# (name, cin, cout, kernel, dilation, padding, map, groups): DeepLab's atrous 3x3s (output stride 8 at 224: 28x28),
# a depthwise one (MobileNet DeepLab), Inception-v3's 1x7 / 7x1 at 17x17
CASES = [("3x3 d2 256 28x28", 256, 256, (3, 3), (2, 2), (2, 2), (28, 28), 1),
         ("3x3 d2 512 28x28", 512, 512, (3, 3), (2, 2), (2, 2), (28, 28), 1),
         ("3x3 d2 128 56x56", 128, 128, (3, 3), (2, 2), (2, 2), (56, 56), 1),
         ("3x3 d3 256 28x28", 256, 256, (3, 3), (3, 3), (3, 3), (28, 28), 1),
         ("dw 3x3 d2 256 28x28", 256, 256, (3, 3), (2, 2), (2, 2), (28, 28), 256),
         ("1x7 192 17x17", 192, 192, (1, 7), (1, 1), (0, 3), (17, 17), 1),
         ("7x1 192 17x17", 192, 192, (7, 1), (1, 1), (3, 0), (17, 17), 1)]
SPARSITY = {"dense": None,
            "patterns": sf.PatternConfig(num_patterns=8, connectivity=1.0, prune_first_conv=True),
            "pattern8x": sf.PatternConfig(**P8, prune_first_conv=True),
            "magnitude8x": sf.MagnitudeConfig(sparsity=0.875, prune_first_conv=True)}


def _median_ms(ts: list[float]) -> float:
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=25, help="alternating rounds per conv and sparsity")
    ap.add_argument("--sparsity", default=",".join(SPARSITY))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "embedded_convs"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for name, cin, cout, k, d, p, hw, g in CASES:
        for sp in a.sparsity.split(","):
            m = nn.Sequential(nn.Conv2d(cin, cout, k, 1, p, d, g), nn.BatchNorm2d(cout), nn.ReLU()).eval()
            with torch.no_grad():
                m[1].running_mean.uniform_(-0.5, 0.5)
                m[1].running_var.uniform_(0.5, 2.0)
            if SPARSITY[sp] is not None:
                sf.prune(m, SPARSITY[sp])
            w = m[0].weight * getattr(m[0], "weight_mask", 1)
            density = float((w != 0).float().mean())
            x = torch.randn(1, cin, *hw)
            e = sf.compile(m, x, threads=a.threads, plan_options=PlanOptions(embed_max_density=1.0))
            sess = onnxruntime_session(nn.Sequential(nn.Conv2d(cin, cout, k, 1, p, d, g), nn.BatchNorm2d(cout),
                                                     nn.ReLU()).eval(), x, a.threads)
            arms = {"engine": lambda: e(x), "pytorch": lambda: m(x)}
            if sess is not None:
                feed = {sess.get_inputs()[0].name: x.numpy()}
                arms["onnxruntime"] = lambda: sess.run(None, feed)
            ts = {n: [] for n in arms}
            with torch.inference_mode():
                for _ in range(3):
                    for f in arms.values():
                        f()
                for _ in range(a.runs):
                    for n, f in arms.items():
                        t0 = time.perf_counter()
                        f()
                        ts[n].append(time.perf_counter() - t0)
            row = {"conv": name, "sparsity": sp, "density": round(density, 3),
                   "mode": next(op.get("mode") for op in e.spec["ops"] if "mode" in op),
                   **{f"{n}_ms": round(_median_ms(t), 4) for n, t in ts.items()},
                   **{f"{n}_spread_ms": [round(1e3 * min(t), 4), round(1e3 * max(t), 4)] for n, t in ts.items()}}
            for n in ts:
                if n != "engine":
                    row[f"speedup_vs_{n}"] = round(_median_ms(ts[n]) / _median_ms(ts["engine"]), 3)
            rows.append(row)
            print(f"{name:22s} {sp:11s} density {density:.3f} {row['mode']:10s} " + " ".join(
                f"{n} {row[f'{n}_ms']:.3f} ms" for n in ts) + "  engine " + " ".join(
                f"{row[k_]:.2f}x vs {k_[11:]}" for k_ in row if k_.startswith("speedup_vs_")), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {
        "benchmark": "embedded_convs", "threads": a.threads, "runs": a.runs, "batch": 1,
        "method": "one conv+BN+ReLU, every conv forced native (embed_max_density 1.0); arms alternate in one "
                  "process; medians, [min, max] per arm", "rows": rows, "env": environment()})
    fig, ax = plt.subplots(figsize=(11, 4.5))
    sps = a.sparsity.split(",")
    width = 0.8 / len(sps)
    for j, sp in enumerate(sps):
        ys = [next(r["speedup_vs_pytorch"] for r in rows if r["conv"] == c[0] and r["sparsity"] == sp) for c in CASES]
        ax.bar([i + j * width for i in range(len(CASES))], ys, width, label=sp)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(CASES))], [c[0] for c in CASES], rotation=20, fontsize=8)
    ax.set_ylabel("engine speedup vs PyTorch (oneDNN)")
    ax.set_title(f"embedded dilated / non-square convs, b1, {a.threads} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
