"""RepGhostNet at 224x224, batch 1: the folded network through sparseforge.compile vs the unfolded (training-form)
network in PyTorch vs the folded one in PyTorch (BN folded) and onnxruntime fp32, arms alternating in one process.

The structural re-parameterization's claim is that the folded network is what ships: this measures whether the
engine runs it at least as fast as onnxruntime (issue 27, acceptance 3), and whether it is faster than the
concat-based GhostNet of about the same multiply-adds (the paper's claim, issue 27 acceptance 2) on each runtime:
GhostNet 1.0x (141 M MACs, 5.2 M parameters) beside RepGhostNet 1.0x (142 M, 4.1 M folded) in the same loop.
Random weights with non-trivial BN statistics (folding measured as on trained weights); outputs of every arm
checked against the unfolded network.

Run (quiet machine): python bench/repghost_speed.py [--width 1.0] [--threads 2] [--runs 30]
Writes bench/results/repghost_speed_224.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import sparseforge as sf
from sparseforge.engine.testing import random_bn_statistics
from sparseforge.models.reparam import reparameterize
from sparseforge.report.env import environment
from sparseforge.report.latency import measure, onnxruntime_session, torch_fused
from sparseforge.structured import count_macs
from sparseforge.report.plots import plt

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "repghost_speed_224"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    train_form = sf.create_model("repghostnet", num_classes=1000, width=a.width, input_size=224)
    random_bn_statistics(train_form, torch.Generator().manual_seed(0))
    train_form.eval()
    folded = reparameterize(copy.deepcopy(train_form)).eval()
    x = torch.randn(1, 3, 224, 224)
    engine = sf.compile(folded, x, threads=a.threads)
    sess = onnxruntime_session(folded, x, a.threads)
    fused = torch_fused(folded)
    with torch.inference_mode():
        ref = train_form(x)
        errs = {"folded-pytorch": float((folded(x) - ref).abs().max() / ref.abs().max()),
                "sparseforge": float((engine(x) - ref).abs().max() / ref.abs().max())}
        if sess is not None:
            errs["onnxruntime-fp32"] = float((torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]) - ref).abs().max()
                                             / ref.abs().max())
    ghost = sf.create_model("ghostnet", num_classes=1000, width=a.width, input_size=224)
    random_bn_statistics(ghost, torch.Generator().manual_seed(0))
    ghost.eval()
    g_engine = sf.compile(ghost, x, threads=a.threads)
    g_sess = onnxruntime_session(ghost, x, a.threads)
    g_fused = torch_fused(ghost)
    with torch.inference_mode():
        g_ref = ghost(x)
        errs["ghostnet-sparseforge"] = float((g_engine(x) - g_ref).abs().max() / g_ref.abs().max())
    xn = x.numpy()
    fns = {"pytorch-unfolded": lambda: train_form(x), "pytorch-folded": lambda: fused(x),
           "sparseforge": lambda: engine(x), "ghostnet-pytorch": lambda: g_fused(x),
           "ghostnet-sparseforge": lambda: g_engine(x)}
    if sess is not None:
        fns["onnxruntime-fp32"] = lambda: sess.run(None, {"input": xn})
    if g_sess is not None:
        fns["ghostnet-onnxruntime-fp32"] = lambda: g_sess.run(None, {"input": xn})
    lat = measure(fns, runs=a.runs)
    params = lambda m: sum(p.numel() for p in m.parameters())      # noqa: E731
    g_params = params(ghost)
    # runtime -> (folded RepGhostNet's arm, GhostNet's arm)
    pairs = {"pytorch": ("pytorch-folded", "ghostnet-pytorch"), "sparseforge": ("sparseforge", "ghostnet-sparseforge"),
             "onnxruntime-fp32": ("onnxruntime-fp32", "ghostnet-onnxruntime-fp32")}
    vs_ghost = {rt: lat[g]["median_ms"] / lat[r]["median_ms"] for rt, (r, g) in pairs.items() if r in lat and g in lat}
    doc = {"benchmark": "repghost_speed", "model": f"repghostnet-{a.width}", "size": 224, "batch": 1,
           "ghostnet": {"width": a.width, "params": g_params, "macs": count_macs(ghost, x),
                        "engine_fallbacks": [op["describe"] for op in g_engine.spec["ops"] if not op["native"]]},
           "repghostnet_macs_folded": count_macs(folded, x),
           "repghostnet_speedup_vs_ghostnet": vs_ghost,
           "threads": a.threads, "runs": a.runs, "params_unfolded": params(train_form), "params_folded": params(folded),
           "max_rel_error_vs_unfolded": errs, "latency": lat,
           "engine_fallbacks": [op["describe"] for op in engine.spec["ops"] if not op["native"]],
           "engine_vs_onnxruntime_fp32": (lat["onnxruntime-fp32"]["median_ms"] / lat["sparseforge"]["median_ms"]
                                          if "onnxruntime-fp32" in lat else None),
           "env": environment()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(lat)
    ax.barh(names, [lat[n]["median_ms"] for n in names],
            xerr=[[lat[n]["median_ms"] - lat[n]["p10_ms"] for n in names], [lat[n]["p90_ms"] - lat[n]["median_ms"]
                                                                         for n in names]], color="#4c72b0")
    ax.set_xlabel(f"ms, batch 1, {a.threads} threads (median, p10-p90)")
    ax.set_title(f"RepGhostNet {a.width}x at 224: {doc['env']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    for n in names:
        print(f"{n:18s} {lat[n]['median_ms']:7.2f} ms  (p10 {lat[n]['p10_ms']:.2f}, p90 {lat[n]['p90_ms']:.2f})")
    print("errors vs unfolded:", errs, "fallbacks:", doc["engine_fallbacks"])
    print("engine vs onnxruntime fp32:", doc["engine_vs_onnxruntime_fp32"])
    print(f"GhostNet {a.width}x: {g_params / 1e6:.2f} M params, {doc['ghostnet']['macs'] / 1e6:.1f} M MACs; RepGhostNet "
          f"folded {params(folded) / 1e6:.2f} M, {doc['repghostnet_macs_folded'] / 1e6:.1f} M MACs")
    print("RepGhostNet (folded) speedup over GhostNet per runtime:", {k: round(v, 3) for k, v in vs_ghost.items()})


if __name__ == "__main__":
    main()
