"""Low precision on ResNet-20 (shared weights and data), the same training budget E per arm:

  fp32            dense fine-tuning (control)
  pow2            SmartDeal decomposition, pow2 coefficients (k in [-8, 0], delta 4e-3), trained E epochs
  pattern8x-pow2  ADMM E/2 to pattern 8x, then pow2 E/2 on the pruned weights
  fixed8          fake-quantised weights/activations/gradients at 8 bits, E epochs
  progressive     forward bits 3->4->6->8, gradient bits 6->6->8->8 on loss plateaus (period P iterations)

Reports accuracy, weight storage (bits) and training bit-operations saved vs the fixed 8-bit run, and the
localized Lipschitz curve of fp32 vs pow2.
Run: python bench/lowbit.py --epochs 2 ; writes bench/results/lowbit.json and lowbit.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparseforge.api import datasets_for, loaders_for
from sparseforge.models import load_weights, model_from_spec, read_state_dict
from _arms import TRAIN, run_resnet20_arm  # bench/ is on sys.path when this script runs
from sparseforge.train import TrainConfig
from sparseforge.report import lipschitz, plot_lipschitz
from sparseforge.report.env import environment

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "bench" / "results" / "lowbit"


def arms(E: int, period: int) -> dict[str, list[dict]]:
    half = max(1, E // 2)
    return {
        "fp32": [{"method": "finetune", "epochs": E}],
        "pow2": [{"method": "pow2", "epochs": E}],
        "pattern8x-pow2": [{"method": "admm", "epochs": half, "rho": 5e-3, "rho_factor": 1.5, "update_every": 100,
                            "target": {"num_patterns": 8, "connectivity": "3.6x"}},
                           {"method": "pow2", "epochs": half}],
        "fixed8": [{"method": "precision", "epochs": E, "forward_bits": [8], "grad_bits": [8], "period": period}],
        "progressive": [{"method": "precision", "epochs": E, "forward_bits": [3, 4, 6, 8], "grad_bits": [6, 6, 8, 8],
                         "period": period, "window": 5, "epsilon": 0.1}],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--period", type=int, default=40, help="iterations per plateau period (paper: 400)")
    ap.add_argument("--arms", default="")
    ap.add_argument("--data-dir", default=str(SHARED / "data" / "cifar-10-batches-py"))
    a = ap.parse_args()
    table = arms(a.epochs, a.period)
    names = a.arms.split(",") if a.arms else list(table)
    out = {"benchmark": "lowbit", "epochs": a.epochs, "period": a.period, "arms": {}}
    finals = {}
    for name in names:
        d = OUT / name
        t0 = time.perf_counter()
        res = run_resnet20_arm(table[name], d, a.data_dir)
        last = res["stages"][-1]
        out["arms"][name] = {"final_acc": res["final"]["acc"], "start_acc": res["start"]["acc"],
                             "storage_bits": last.get("storage_bits"), "precision": last.get("precision"),
                             "wall_s": round(time.perf_counter() - t0, 1)}
        p = d / "model.safetensors"
        finals[name] = load_weights(model_from_spec(json.loads(read_state_dict(p)[1]["model"])), p).eval()
        print(f"{name}: {res['final']['acc']:.2f}%", flush=True)
    # robustness: the same 256 test images for every model
    cfg = TrainConfig(model="resnet20", dataset="cifar10", data_dir=a.data_dir, **TRAIN)
    _, test = datasets_for(cfg)
    _, el = loaders_for(cfg, test, test)
    curves = {n: lipschitz(m, el.iterate(0, 0), eps_values=(0.01, 0.03, 0.1, 0.3, 1.0), max_samples=256) for n, m in finals.items()}
    out["lipschitz"] = {n: {str(k): v for k, v in c.items()} for n, c in curves.items()}
    out["env"] = environment()
    (ROOT / "bench" / "results" / "lowbit.json").write_text(json.dumps(out, indent=2, default=str))
    plot_lipschitz(curves, ROOT / "bench" / "results" / "lowbit.png")
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, default=str)[:3000])


if __name__ == "__main__":
    main()
