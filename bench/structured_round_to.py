"""Which ``StructuredConfig.round_to`` should be the default: channel widths a CPU vectorises.

For each start model, dependency-group channel pruning to half the MACs (mac_ratio=0.5, l1, global scope) with
round_to in {1, 2, 4, 8, 16}; each pruned network's PyTorch latency (BN folded, eval, inference_mode) at batch
1 and 32 against the unpruned network, every arm alternating in one process (report.latency.measure), with
each arm's MACs and widths (accuracy after fine-tuning: the frontier's structured arm). Writes JSON and a plot.

  python bench/structured_round_to.py --threads 2 --runs 30 --out bench/results/structured_round_to
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import sparseforge as sf
from sparseforge.report.env import environment
from sparseforge.report.latency import measure, torch_fused
from sparseforge.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STARTS = {"resnet56": SHARED / "models" / "akamaster_resnet56-4bfd9763.th",
          "resnet20": SHARED / "models" / "resnet20-cifar10jpeg.safetensors"}


def widths(m: torch.nn.Module) -> list[int]:
    return [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet56,resnet20")
    ap.add_argument("--round-to", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "structured_round_to"))
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    from sparseforge.structured.prune import count_macs

    rows = []
    for name in a.models.split(","):
        start = sf.load_weights(sf.create_model(name), STARTS[name]).eval()
        arms = {"dense": start}
        for r in [int(v) for v in a.round_to.split(",")]:
            m = sf.prune(copy.deepcopy(start), sf.StructuredConfig(mac_ratio=0.5, round_to=r),
                         example_input=torch.randn(1, 3, 32, 32))
            arms[f"round_to={r}"] = m.eval()
        for b in [int(v) for v in a.batches.split(",")]:
            x = torch.randn(b, 3, 32, 32)
            fused = {k: torch_fused(m) for k, m in arms.items()}
            res = measure({k: (lambda f=f: f(x)) for k, f in fused.items()}, runs=a.runs)
            for k, m in arms.items():
                row = {"model": name, "arm": k, "batch": b, **res[k],
                       "speedup_vs_dense": res["dense"]["median_ms"] / res[k]["median_ms"]}
                if "macs" not in next((r for r in rows if r["model"] == name and r["arm"] == k), {}):
                    row.update(macs=count_macs(m, torch.randn(1, 3, 32, 32)), min_width=min(widths(m)),
                               widths_not_multiple_of_8=sum(w % 8 != 0 for w in widths(m)))
                rows.append(row)
                print(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
    doc = {"benchmark": "structured_round_to", "threads": a.threads, "runs": a.runs, "rows": rows, "env": environment()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), doc)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, b in zip(axes, [int(v) for v in a.batches.split(",")][:2]):
            for name in a.models.split(","):
                rs = [r for r in rows if r["model"] == name and r["batch"] == b and r["arm"] != "dense"]
                ax.plot([int(r["arm"].split("=")[1]) for r in rs], [r["speedup_vs_dense"] for r in rs], "o-", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("round_to")
            ax.set_ylabel("PyTorch speedup vs dense (mac_ratio 0.5)")
            ax.set_title(f"batch {b}, {a.threads} threads")
            ax.axhline(1, color="grey", lw=0.5)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
