"""Channel moves and resizes: networks that need them, through the engine with them native (the defaults) and as
PyTorch fallbacks (what ran before session 47), vs onnxruntime fp32 dense, batch 1, the arms alternating in blocks
in one process (report.latency.measure).

Why: ShuffleNetV2's chunk and channel shuffle (view, transpose, view) and a decoder's F.interpolate used to break a
network into native segments with PyTorch ops between them; trace.channel_gathers and ResizeOp now run them as
plane copies and table lookups. This measures what that is worth on ShuffleNetV2 x1.0 (the zoo's, 224) and on a
small U-Net-style encoder-decoder (bilinear and nearest upsampling to the skips' sizes, 224), dense and 8x:
  python bench/channel_moves.py --threads 2
Writes bench/results/channel_moves.json and .png (speedup over onnxruntime per network and arm).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseforge as sf
from sparseforge.engine.plan import PlanOptions
from sparseforge.engine.testing import random_bn_statistics
from sparseforge.report.env import environment
from sparseforge.report.latency import measure, onnxruntime_session
from sparseforge.report.plots import plt  # Agg backend
from sparseforge.utils import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import CONFIGS  # noqa: E402  (bench/ is on sys.path when this script runs)

ROOT = Path(__file__).resolve().parents[1]


def _cbr(i: int, o: int, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class UNetSmall(nn.Module):
    """Three strided encoder stages and a decoder that upsamples to each skip's size (read in forward) and
    concatenates: bilinear at the two deep levels, nearest at the top, as U-Net / FPN variants do."""

    def __init__(self, w: int = 32):
        super().__init__()
        self.e1, self.e2, self.e3, self.e4 = _cbr(3, w), _cbr(w, 2 * w, 2), _cbr(2 * w, 4 * w, 2), _cbr(4 * w, 8 * w, 2)
        self.d3, self.d2, self.d1 = _cbr(12 * w, 4 * w), _cbr(6 * w, 2 * w), _cbr(3 * w, w)
        self.head = nn.Conv2d(w, 5, 1)

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(a)
        c = self.e3(b)
        d = self.e4(c)
        c = self.d3(torch.cat([c, F.interpolate(d, size=c.shape[-2:], mode="bilinear", align_corners=False)], 1))
        b = self.d2(torch.cat([b, F.interpolate(c, size=b.shape[-2:], mode="bilinear", align_corners=False)], 1))
        a = self.d1(torch.cat([a, F.interpolate(b, scale_factor=2, mode="nearest")], 1))
        return self.head(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "channel_moves"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    off = PlanOptions(channel_gathers=False, native_resize=False)
    rows = []
    for net in ("shufflenet_v2_x1_0", "unet_small"):
        for sparsity in ("dense", "pattern8x"):
            torch.manual_seed(0)
            dense = sf.create_model(net) if net != "unet_small" else UNetSmall()
            random_bn_statistics(dense, torch.Generator().manual_seed(0))
            dense.eval()
            m = copy.deepcopy(dense)
            if sparsity != "dense":
                sf.prune(m, CONFIGS[sparsity])
            x = torch.randn(1, 3, a.size, a.size)
            e_on = sf.compile(m, x, threads=a.threads)
            e_off = sf.compile(m, x, threads=a.threads, plan_options=off)
            sess = onnxruntime_session(dense, x, a.threads)
            if sess is None:
                sys.exit("onnxruntime is not installed: pip install -e '.[bench]'")
            feed = {sess.get_inputs()[0].name: x.numpy()}
            with torch.inference_mode():
                ref = m(x)
                err = max(float((e(x) - ref).abs().max() / ref.abs().max()) for e in (e_on, e_off))
            arms = {"engine": lambda: e_on(x), "engine-moves-in-pytorch": lambda: e_off(x),
                    "onnxruntime-dense": lambda: sess.run(None, feed)}
            r = measure(arms, runs=a.runs)
            med = {k: v["median_ms"] for k, v in r.items()}
            ops = e_on.spec["ops"]
            row = {"network": net, "sparsity": sparsity, "size": a.size, "threads": a.threads, "batch": 1,
                   "arms": r, "max_rel_error_vs_torch": err,
                   "native_gathers": sum(op["kind"] == "gather" for op in ops),
                   "native_resizes": sum(op["kind"] == "resize" for op in ops),
                   "engine_fallbacks": [op["describe"] for op in ops if not op["native"]],
                   "fallbacks_with_moves_off": sum(not op["native"] for op in e_off.spec["ops"]),
                   "speedup_vs_onnxruntime": {k: med["onnxruntime-dense"] / med[k] for k in med if k != "onnxruntime-dense"}}
            rows.append(row)
            print(f"{net:20s} {sparsity:9s} engine {med['engine']:.2f} ms, moves in PyTorch "
                  f"{med['engine-moves-in-pytorch']:.2f} ms ({row['fallbacks_with_moves_off']} fallbacks), "
                  f"onnxruntime {med['onnxruntime-dense']:.2f} ms -> x{row['speedup_vs_onnxruntime']['engine']:.2f} "
                  f"(was x{row['speedup_vs_onnxruntime']['engine-moves-in-pytorch']:.2f}); {row['native_gathers']} "
                  f"gathers, {row['native_resizes']} resizes native, err {err:.1e}", flush=True)
    doc = {"benchmark": "channel_moves", "method": "report.latency.measure: arms alternating in blocks in one "
           "process, median of the timed calls; speedup = onnxruntime fp32 dense median / arm median",
           "results": rows, "env": environment()}
    out = Path(a.out)
    atomic_write_json(out.with_suffix(".json"), doc)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['network']}\n{r['sparsity']}" for r in rows]
    for i, arm in enumerate(("engine", "engine-moves-in-pytorch")):
        ax.bar([j + (i - 0.5) * 0.35 for j in range(len(rows))], [r["speedup_vs_onnxruntime"][arm] for r in rows],
               0.35, label=arm)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel(f"speedup vs onnxruntime fp32, b1, {a.threads} threads")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
