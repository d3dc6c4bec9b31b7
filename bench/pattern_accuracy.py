"""Accuracy of pattern pruning vs a dense control and unstructured magnitude pruning, same budget per arm.

ResNet-20 from ../shared/models/resnet20-cifar10jpeg.safetensors on the shared (JPEG-derived) CIFAR-10.
Every arm trains for the same number of epochs with the same optimiser and one-cycle schedule:

  control         dense fine-tuning, E epochs
  pattern-2.25x   ADMM E/2 epochs (pattern target) -> hard prune -> masked retraining E/2
  pattern-8x      ADMM E/2 (pattern + connectivity 3.6x) -> hard prune -> masked retraining E/2
  magnitude-8x    one-shot global magnitude at the pattern-8x arm's weight count -> masked retraining E
  pattern-8x-cb2  as pattern-8x with channel_block=2
  pattern-8x-oneshot (optional, --oneshot) one-shot projection -> masked retraining E

Each arm is a recipe run (resumable: re-running skips finished arms and stages).
Run: python bench/pattern_accuracy.py --epochs 6 [--arms control,pattern-8x] [--data-dir ...]
Writes bench/results/pattern_accuracy/results.json and accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from sparseforge import PatternConfig, create_model, load_weights, prune
from sparseforge.recipe import Recipe, RecipeRunner
from sparseforge.report.env import environment
from sparseforge.report.plots import plot_curves
from sparseforge.sparsity import masked_modules

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def matched_magnitude_sparsity(weights: str, target: PatternConfig) -> float:
    """Sparsity over the same layers that gives the pattern arm's exact weight count."""
    m = create_model("resnet20")
    load_weights(m, weights)
    prune(m, target)
    kept = sum(int(mod.weight_mask.sum()) for _, mod in masked_modules(m))
    total = sum(mod.weight.numel() for _, mod in masked_modules(m))
    return 1.0 - kept / total


def arms(E: int, weights: str, admm: dict, oneshot: bool) -> dict[str, list[dict]]:
    half = max(1, E // 2)
    p8 = {"num_patterns": 8, "connectivity": "3.6x"}
    p225 = {"num_patterns": 8, "connectivity": 1.0}
    sp = matched_magnitude_sparsity(weights, PatternConfig(**p8))
    out = {
        "control": [{"method": "finetune", "epochs": E}],
        "pattern-2.25x": [{"method": "admm", "epochs": half, **admm, "target": p225}, {"method": "finetune", "epochs": E - half}],
        "pattern-8x": [{"method": "admm", "epochs": half, **admm, "target": p8}, {"method": "finetune", "epochs": E - half}],
        "magnitude-8x": [{"method": "magnitude", "sparsity": sp}, {"method": "finetune", "epochs": E}],
        "pattern-8x-cb2": [{"method": "admm", "epochs": half, **admm, "target": {**p8, "channel_block": 2}},
                           {"method": "finetune", "epochs": E - half}],
    }
    if oneshot:
        out["pattern-8x-oneshot"] = [{"method": "pattern", **p8}, {"method": "finetune", "epochs": E}]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6, help="training epochs per arm (budget)")
    ap.add_argument("--arms", default="", help="comma-separated subset")
    ap.add_argument("--oneshot", action="store_true", help="add the naive one-shot pattern-8x arm")
    ap.add_argument("--data-dir", default=str(SHARED / "data" / "cifar-10-batches-py"))
    ap.add_argument("--weights", default=str(SHARED / "models" / "resnet20-cifar10jpeg.safetensors"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pattern_accuracy"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--rho", type=float, default=5e-3)
    ap.add_argument("--rho-factor", type=float, default=1.5)
    ap.add_argument("--update-every", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (smoke tests only)")
    ap.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test images (smoke tests only)")
    a = ap.parse_args()
    out = Path(a.out)
    train = {"batch_size": 128, "lr": a.lr, "schedule": "onecycle", "optimizer": "sgd", "momentum": 0.9,
             "nesterov": True, "weight_decay": 1e-4, "threads": a.threads, "channels_last": True,
             "max_steps_per_epoch": a.max_steps, "seed": 0}
    admm = {"rho": a.rho, "rho_factor": a.rho_factor, "rho_max": 1.0, "update_every": a.update_every}
    all_arms = arms(a.epochs, a.weights, admm, a.oneshot)
    chosen = [s for s in a.arms.split(",") if s] or list(all_arms)
    results = {}
    if (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text()).get("arms", {})
    for name in chosen:
        recipe = Recipe.from_dict({"model": "resnet20", "weights": a.weights, "dataset": "cifar10",
                                   "data_dir": a.data_dir, "train": train, "stage": all_arms[name]})
        run_dir = out / name
        t0 = time.perf_counter()
        print(f"== arm {name}", file=sys.stderr)
        res = RecipeRunner(recipe, run_dir, progress=False, eval_limit=a.eval_limit).run(resume=run_dir.exists())
        sp = json.loads((run_dir / "results.json").read_text())["sparsity"]
        results[name] = {
            "final_acc": res["final"]["acc"], "start_acc": res["start"]["acc"],
            "stage_acc": [s["eval"]["acc"] for s in res["stages"]],
            "epoch_test_acc": [r.get("test_acc") for s in res["stages"] if "train" in s for r in [s["train"]]],
            "conv_linear_nonzero": sp["conv_linear_nonzero"], "conv_linear_params": sp["conv_linear_params"],
            "compression_conv_linear": sp["compression_conv_linear"], "mac_reduction": sp["mac_reduction"],
            "stages": all_arms[name], "seconds_this_invocation": round(time.perf_counter() - t0, 1),
        }
        print(f"== {name}: {results[name]['final_acc']:.2f}% ({sp['compression_conv_linear']:.2f}x fewer conv/linear weights)",
              file=sys.stderr)
        doc = {"benchmark": "pattern_accuracy", "model": "resnet20", "epochs_per_arm": a.epochs, "train": train,
               "admm": admm, "eval_images": a.eval_limit or 10000, "arms": results, "env": environment()}
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=2))
    # plot: accuracy per epoch for each arm (epoch metrics from the run directories)
    series = {}
    for name in results:
        accs = []
        for sdir in sorted((out / name / "stages").glob("*")):
            mf = sdir / "metrics.jsonl"
            if mf.exists():
                accs += [json.loads(l).get("test_acc") for l in mf.read_text().splitlines() if l.strip()]
        accs = [x for x in accs if x is not None]
        if accs:
            series[f"{name} ({results[name]['final_acc']:.2f}%)"] = (list(range(1, len(accs) + 1)), accs)
    if series:
        plot_curves(series, out / "accuracy.png", "epoch (budget)", "test top-1 (%)",
                    f"ResNet-20, shared CIFAR-10 (JPEG-derived), {a.epochs} epochs per arm")
    print(json.dumps({k: round(v["final_acc"], 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
