"""Dilated and non-square convs: the engine's embedded kernels vs PyTorch (oneDNN, BatchNorm folded: what the engine
falls back to) and onnxruntime fp32, one conv + BatchNorm + ReLU at a time, batch 1, the arms alternating in blocks
in one process (report.latency.measure: each block after the previous arm's threads stop spinning).

Why: the engine runs these convs in a square kernel whose other taps are structural zeros (trace.embed_conv) when
they are sparse enough (PlanOptions.embed_max_kernels); this measures where that pays, dense to pattern 8x, and
is what those defaults were set from (every conv is forced native here, whatever it keeps):
  python bench/embedded_convs.py --threads 2
and, with --networks, DeepLab's backbones (ResNet-50 with replace_stride_with_dilation: output stride 16 and 8) at
224, pattern 8x, through the engine with its defaults and with embedding off (every dilated conv in oneDNN, as
before session 46), vs onnxruntime fp32 dense.
Writes bench/results/embedded_convs.json and .png (speedup of the engine over each arm per conv and sparsity).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.engine.plan import PlanOptions
from sparseforge.engine.testing import random_bn_statistics
from sparseforge.report.env import environment
from sparseforge.report.latency import measure, onnxruntime_session, torch_fused
from sparseforge.report.plots import plt  # Agg backend
from sparseforge.utils import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import CONFIGS, P8  # noqa: E402  (bench/ is on sys.path when this script runs)

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
            "magnitude8x": sf.MagnitudeConfig(sparsity=0.875, prune_first_conv=True),
            "kernels4x": "kernels4x"}     # the quarter of the kernels with the largest L1 norm kept (any kernel shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20, help="timed calls per arm, conv and sparsity")
    ap.add_argument("--sparsity", default=",".join(SPARSITY))
    ap.add_argument("--networks", action="store_true", help="also DeepLab's ResNet-50 backbones (output stride 16, 8)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "embedded_convs"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows, nets = [], []
    for os_, rswd in ((16, (False, False, True)), (8, (False, True, True))) if a.networks else ():
        torch.manual_seed(0)
        m = sf.create_model("resnet50", replace_stride_with_dilation=rswd)
        random_bn_statistics(m, torch.Generator().manual_seed(0))
        dense = m.eval()
        m = sf.prune(copy.deepcopy(dense), CONFIGS["pattern8x"]).eval()
        x = torch.randn(1, 3, 224, 224)
        arms = {"engine": sf.compile(m, x, threads=a.threads),
                "engine_no_embed": sf.compile(m, x, threads=a.threads, plan_options=PlanOptions(embed_max_kernels=-1.0))}
        fns = {n: (lambda e=e: e(x)) for n, e in arms.items()}
        sess = onnxruntime_session(dense, x, a.threads)
        if sess is not None:
            feed = {sess.get_inputs()[0].name: x.numpy()}
            fns["onnxruntime"] = lambda: sess.run(None, feed)
        r = measure(fns, runs=a.runs)
        row = {"network": f"resnet50 output stride {os_} (DeepLab backbone)", "config": "pattern8x", "size": 224,
               "fallbacks": {n: [op["describe"] for op in e.spec["ops"] if not op["native"]] for n, e in arms.items()},
               **{f"{n}_ms": round(v["median_ms"], 3) for n, v in r.items()},
               **{f"{n}_p10_p90_ms": [round(v["p10_ms"], 3), round(v["p90_ms"], 3)] for n, v in r.items()}}
        for n in r:
            if n != "engine":
                row[f"speedup_vs_{n}"] = round(r[n]["median_ms"] / r["engine"]["median_ms"], 3)
        nets.append(row)
        print(f"resnet50 OS{os_} pattern8x: " + " ".join(f"{n} {v['median_ms']:.2f} ms" for n, v in r.items())
              + f"; fallbacks {[len(v) for v in row['fallbacks'].values()]}", flush=True)
    for name, cin, cout, k, d, p, hw, g in CASES:
        for sp in a.sparsity.split(","):
            m = nn.Sequential(nn.Conv2d(cin, cout, k, 1, p, d, g), nn.BatchNorm2d(cout), nn.ReLU()).eval()
            with torch.no_grad():
                m[1].running_mean.uniform_(-0.5, 0.5)
                m[1].running_var.uniform_(0.5, 2.0)
            if SPARSITY[sp] == "kernels4x":
                with torch.no_grad():
                    kern = m[0].weight.flatten(2)
                    norm = kern.abs().sum(2)
                    kern[norm < norm.flatten().kthvalue(norm.numel() - norm.numel() // 4).values] = 0
            elif SPARSITY[sp] is not None:
                sf.prune(m, SPARSITY[sp])
            w = m[0].weight * getattr(m[0], "weight_mask", 1)
            density = float((w != 0).float().mean())
            x = torch.randn(1, cin, *hw)
            e = sf.compile(m, x, threads=a.threads, plan_options=PlanOptions(embed_max_kernels=1.0, embed_grouped=True))
            sess = onnxruntime_session(nn.Sequential(nn.Conv2d(cin, cout, k, 1, p, d, g), nn.BatchNorm2d(cout),
                                                     nn.ReLU()).eval(), x, a.threads)
            tm = torch_fused(m)
            arms = {"engine": lambda: e(x), "pytorch": lambda: tm(x)}
            if sess is not None:
                feed = {sess.get_inputs()[0].name: x.numpy()}
                arms["onnxruntime"] = lambda: sess.run(None, feed)
            r = measure(arms, runs=a.runs)
            kept = float((w.flatten(2) != 0).any(2).float().mean())
            row = {"conv": name, "sparsity": sp, "density": round(density, 3), "kernels_kept": round(kept, 3),
                   "mode": next(op.get("mode") for op in e.spec["ops"] if "mode" in op),
                   **{f"{n}_ms": round(v["median_ms"], 4) for n, v in r.items()},
                   **{f"{n}_p10_p90_ms": [round(v["p10_ms"], 4), round(v["p90_ms"], 4)] for n, v in r.items()}}
            for n in r:
                if n != "engine":
                    row[f"speedup_vs_{n}"] = round(r[n]["median_ms"] / r["engine"]["median_ms"], 3)
            ts = r
            rows.append(row)
            print(f"{name:22s} {sp:11s} density {density:.3f} kernels {kept:.2f} {row['mode']:10s} " + " ".join(
                f"{n} {row[f'{n}_ms']:.3f} ms" for n in ts) + "  engine " + " ".join(
                f"{row[k_]:.2f}x vs {k_[11:]}" for k_ in row if k_.startswith("speedup_vs_")), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {
        "benchmark": "embedded_convs", "threads": a.threads, "runs": a.runs, "batch": 1,
        "method": "one conv+BN+ReLU, every conv forced native (embed_max_kernels 1.0, embed_grouped); report.latency.measure: arms "
                  "alternate in blocks of 5 in one process; medians, [p10, p90] per arm", "rows": rows, "networks": nets,
        "env": environment()})
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
