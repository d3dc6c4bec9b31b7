"""Lottery-ticket and distillation arms on ResNet-20 (shared weights, shared JPEG-derived CIFAR-10).

Same budget per arm: E epochs of training after pruning (one-shot global magnitude from the pre-trained
weights; iterative IMP is available as the `imp` recipe stage but costs E per round):

  dense          control: dense fine-tuning, E epochs, lr 0.01 cosine
  ft-S           magnitude pruning to sparsity S -> masked fine-tuning, lr 0.01 cosine
  lrr-S          magnitude pruning to S -> retraining with the original (rewound) LR, lr 0.1 cosine
  kdt-S          as lrr-S with the dense model as teacher (KD ticket: alpha 0.9, T 5, batchmean)
  pattern        ADMM E/2 (8 patterns, connectivity 3.6x) -> masked fine-tuning E/2
  pattern-kd     ADMM E/2 -> KD from the dense model E/2

Run: python bench/tickets.py --epochs 2 [--arms dense,ft-0.8,...]   (~4 min per ResNet-20 epoch on 2 cores)
Writes bench/results/tickets.json and tickets.png; run directories under bench/results/tickets/ (ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _arms import run_resnet20_arm  # bench/ is on sys.path when this script runs
from sparseforge.report.env import environment
from sparseforge.report.plots import plt

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "bench" / "results" / "tickets"


def arms(E: int) -> dict[str, list[dict]]:
    half = max(1, E // 2)
    out: dict[str, list[dict]] = {"dense": [{"method": "finetune", "epochs": E, "train": {"lr": 0.01}}]}
    for s in (0.8, 0.9):
        prune = {"method": "magnitude", "sparsity": s, "scope": "global"}
        out[f"ft-{s}"] = [prune, {"method": "finetune", "epochs": E, "train": {"lr": 0.01}}]
        out[f"lrr-{s}"] = [prune, {"method": "finetune", "epochs": E, "train": {"lr": 0.1}}]
        out[f"kdt-{s}"] = [prune, {"method": "kd", "epochs": E, "teacher": "start", "T": 5.0, "alpha": 0.9,
                                   "train": {"lr": 0.1}}]
    admm = {"method": "admm", "epochs": half, "rho": 5e-3, "rho_factor": 1.5, "update_every": 100,
            "target": {"num_patterns": 8, "connectivity": "3.6x"}}
    out["pattern"] = [admm, {"method": "finetune", "epochs": half}]
    out["pattern-kd"] = [admm, {"method": "kd", "epochs": half, "teacher": "start", "T": 5.0, "alpha": 0.9}]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--arms", default="")
    ap.add_argument("--data-dir", default=str(SHARED / "data" / "cifar-10-batches-py"))
    a = ap.parse_args()
    table = arms(a.epochs)
    names = a.arms.split(",") if a.arms else list(table)
    results = {"benchmark": "tickets", "epochs": a.epochs, "arms": {}}
    for name in names:
        d = OUT / name
        t0 = time.perf_counter()
        res = run_resnet20_arm(table[name], d, a.data_dir)
        results["arms"][name] = {"start_acc": res["start"]["acc"], "final_acc": res["final"]["acc"],
                                 "stages": [{"method": s["method"], "acc": s["eval"]["acc"]} for s in res["stages"]],
                                 "sparsity": res["sparsity"].get("compression_conv_linear"),
                                 "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{name}: {res['final']['acc']:.2f}%", flush=True)
    results["env"] = environment()
    Path(ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "tickets.json").write_text(json.dumps(results, indent=2, default=str))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(list(results["arms"]), [r["final_acc"] for r in results["arms"].values()])
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"ResNet-20, {a.epochs} epochs per arm after pruning")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "results" / "tickets.png", dpi=120)


if __name__ == "__main__":
    main()
