"""The accuracy-latency frontier: every compression arm trained with the same budget, then measured side by side.

ResNet-20 from ../shared/models/resnet20-cifar10jpeg.safetensors (88.46%) on the shared JPEG-derived CIFAR-10.
Every arm gets the same number of training epochs E from the same start (stated per arm below); an arm may split
them over stages and use any of the toolkit's methods (KD from the dense start included):

  control          dense fine-tuning, E epochs
  magnitude-8x     one-shot global magnitude at pattern-8x's exact weight count -> KD from the start, E epochs
  pattern-2.25x    ADMM A epochs (4-of-9 patterns) -> hard prune -> KD masked retraining E - A
  pattern-4x       as above, + connectivity 1.78x (4x fewer 3x3 weights)
  pattern-8x       as above, + connectivity 3.6x, kernels compete across layers (global scope)
  pattern-8x-cb2   pattern-8x with channel_block=2 (pairs of filters share patterns and kept kernels)
  structured-2x    dependency-group channel pruning to 0.5 of the MACs -> KD, E epochs

Each arm is a resumable recipe run in bench/results/frontier/runs/<arm>/ (ignored: checkpoints); when it ends its
model goes to bench/results/frontier/<arm>.safetensors and its record (recipe, per-stage results, per-epoch
metrics, timing) to <arm>.record.json, both committed, so the frontier accumulates arm by arm across machines.

Train (two arms at a time, one thread each, in the background):
  python bench/frontier.py train --arms pattern-8x --threads 1 &
  python bench/frontier.py train --arms magnitude-8x --threads 1 &
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from sparseforge import PatternConfig, create_model, load_weights, prune
from sparseforge.recipe import Recipe, RecipeRunner
from sparseforge.report.env import environment
from sparseforge.sparsity import masked_modules
from sparseforge.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "bench" / "results" / "frontier"


def matched_magnitude_sparsity(weights: str, target: PatternConfig) -> float:
    """Sparsity over the same layers that gives the pattern arm's exact weight count."""
    m = create_model("resnet20")
    load_weights(m, weights)
    prune(m, target)
    kept = sum(int(mod.weight_mask.sum()) for _, mod in masked_modules(m))
    total = sum(mod.weight.numel() for _, mod in masked_modules(m))
    return 1.0 - kept / total


def arm_stages(E: int, admm_epochs: int, weights: str) -> dict[str, list[dict]]:
    A = min(admm_epochs, E - 1)
    admm = {"rho": 5e-3, "rho_factor": 1.5, "rho_max": 1.0, "update_every": 100}
    kd = {"method": "kd", "teacher": "start", "T": 5.0, "alpha": 0.9}
    p8 = {"num_patterns": 8, "connectivity": "3.6x", "connectivity_scope": "global"}

    def pattern(target: dict) -> list[dict]:
        return [{"method": "admm", "epochs": A, **admm, "target": target}, {**kd, "epochs": E - A}]

    return {
        "control": [{"method": "finetune", "epochs": E}],
        "magnitude-8x": [{"method": "magnitude", "sparsity": matched_magnitude_sparsity(weights, PatternConfig(**p8))},
                         {**kd, "epochs": E}],
        "pattern-2.25x": pattern({"num_patterns": 8, "connectivity": 1.0}),
        "pattern-4x": pattern({"num_patterns": 8, "connectivity": "1.78x", "connectivity_scope": "global"}),
        "pattern-8x": pattern(p8),
        "pattern-8x-cb2": pattern({**p8, "channel_block": 2}),
        "structured-2x": [{"method": "structured", "mac_ratio": 0.5, "round_to": 8}, {**kd, "epochs": E}],
    }


def record_arm(run_dir: Path, arm: str, budget: dict) -> dict:
    """The arm's recipe, per-stage results and per-epoch metrics: small, committed beside its model."""
    rec: dict = {"arm": arm, "budget": budget, "recipe_toml": (run_dir / "recipe.toml").read_text(), "stages": []}
    if (run_dir / "start.json").exists():
        rec["start"] = json.loads((run_dir / "start.json").read_text())
    for sdir in sorted((run_dir / "stages").glob("*")):
        st: dict = {"dir": sdir.name, "done": (sdir / "done.json").exists()}
        if st["done"]:
            st["result"] = json.loads((sdir / "done.json").read_text())
        st["metrics"] = [json.loads(line) for m in sorted(sdir.rglob("metrics.jsonl"))
                         for line in m.read_text().splitlines() if line.strip()]
        rec["stages"].append(st)
    rec["finished"] = (run_dir / "model.safetensors").exists()
    if rec["finished"]:
        res = json.loads((run_dir / "results.json").read_text())
        rec["final_acc"] = res["final"]["acc"]
        rec["sparsity"] = res.get("sparsity")
    return rec


def cmd_train(a: argparse.Namespace) -> None:
    stages = arm_stages(a.epochs, a.admm_epochs, a.weights)
    train = {"batch_size": 128, "lr": a.lr, "schedule": "onecycle", "optimizer": "sgd", "momentum": 0.9,
             "nesterov": True, "weight_decay": 1e-4, "threads": a.threads, "channels_last": True,
             "max_steps_per_epoch": a.max_steps, "seed": 0}
    out = Path(a.out)
    for arm in [s for s in a.arms.split(",") if s]:
        if arm not in stages:
            sys.exit(f"unknown arm {arm!r}: choose from {', '.join(stages)}")
        recipe = Recipe.from_dict({"model": "resnet20", "weights": a.weights, "dataset": "cifar10",
                                   "data_dir": a.data_dir, "train": train, "stage": stages[arm]})
        run_dir = out / "runs" / arm
        budget = {"epochs": a.epochs, "admm_epochs": a.admm_epochs, "lr": a.lr, "schedule": "onecycle per stage",
                  "batch_size": 128, "threads": a.threads}
        print(f"== arm {arm}: {stages[arm]}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        RecipeRunner(recipe, run_dir, progress=False, eval_limit=a.eval_limit).run(
            resume=(run_dir / "recipe.toml").exists())
        rec = record_arm(run_dir, arm, budget)
        rec["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)
        rec["env"] = environment()
        rec["eval_images"] = a.eval_limit or 10000
        shutil.copyfile(run_dir / "model.safetensors", out / f"{arm}.safetensors.tmp")
        (out / f"{arm}.safetensors.tmp").replace(out / f"{arm}.safetensors")
        atomic_write_json(out / f"{arm}.record.json", rec)
        print(f"== {arm}: {rec['final_acc']:.2f}%", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train arms (resumable) and commit-ready outputs")
    t.add_argument("--arms", required=True, help="comma-separated arm names")
    t.add_argument("--epochs", type=int, default=20, help="training epochs per arm (the budget)")
    t.add_argument("--admm-epochs", type=int, default=8, help="of which ADMM, for the pattern arms")
    t.add_argument("--lr", type=float, default=0.02)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--data-dir", default=str(SHARED / "data" / "cifar-10-batches-py"))
    t.add_argument("--weights", default=str(SHARED / "models" / "resnet20-cifar10jpeg.safetensors"))
    t.add_argument("--out", default=str(OUT))
    t.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (smoke tests only)")
    t.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test images (smoke only)")
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    {"train": cmd_train}[a.cmd](a)


if __name__ == "__main__":
    main()
