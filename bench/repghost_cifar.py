"""RepGhostNet vs MobileNetV2 on CIFAR-10, trained from scratch with the same budget (issue 27, acceptance 2).

RepGhost's claim (Chen et al. 2022): feature reuse by re-parameterized addition instead of concatenation gives at
least the accuracy of its peers at fewer or equal FLOPs, and runs faster. No CIFAR number is published, so this
trains both here on the shared JPEG-derived CIFAR-10: RepGhostNet at the width whose MACs match MobileNetV2's
(1.5x: 91 M vs 88 M MACs with the CIFAR stems), each a resumable recipe run with the same epochs, schedule,
optimizer, augmentation and seed. Then the folded RepGhostNet and MobileNetV2 are measured side by side: test
accuracy, params, MACs and batch-1 latency in PyTorch (BN folded), onnxruntime fp32 and sparseforge.compile,
arms alternating in one process.

Train (background, one thread, resumable: rerun the same command after a kill):
  python bench/repghost_cifar.py train --arms mobilenetv2,repghostnet --epochs 4 --threads 1
Measure (quiet machine):
  python bench/repghost_cifar.py measure [--threads 2] [--runs 50]
Writes bench/results/repghost_cifar/<arm>.safetensors + <arm>.record.json (train) and repghost_cifar.json + .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sparseforge.recipe import Recipe, RecipeRunner, run_record
from sparseforge.report.env import environment
from sparseforge.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "bench" / "results" / "repghost_cifar"
ARMS = {"mobilenetv2": ("mobilenetv2", {}), "repghostnet": ("repghostnet", {"width": 1.5})}


def cmd_train(a: argparse.Namespace) -> None:
    from sparseforge.models import load_model, save_weights

    train = {"batch_size": 128, "lr": a.lr, "schedule": "onecycle", "optimizer": "sgd", "momentum": 0.9,
             "nesterov": True, "weight_decay": 5e-5, "threads": a.threads, "channels_last": True,
             "max_steps_per_epoch": a.max_steps, "seed": 0}
    out = Path(a.out)
    for arm in [s for s in a.arms.split(",") if s]:
        if arm not in ARMS:
            sys.exit(f"unknown arm {arm!r}: choose from {', '.join(ARMS)}")
        name, args = ARMS[arm]
        recipe = Recipe.from_dict({"model": name, "model_args": args, "dataset": "cifar10", "data_dir": a.data_dir,
                                   "train": train, "stage": [{"method": "finetune", "epochs": a.epochs}]})
        run_dir = out / "runs" / arm
        print(f"== arm {arm}: {name} {args}, {a.epochs} epochs from scratch", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        runner = RecipeRunner(recipe, run_dir, progress=False, eval_limit=a.eval_limit)
        runner.run(resume=(run_dir / "recipe.toml").exists())
        rec = {"arm": arm, "model": name, "model_args": args,
               "budget": {"epochs": a.epochs, "lr": a.lr, "schedule": "onecycle", "batch_size": 128,
                          "threads": a.threads, "start": "random init (seed 0)"},
               **run_record(run_dir)}
        res = json.loads((run_dir / "results.json").read_text())
        rec["final_acc"] = res["final"]["acc"]
        rec["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)
        rec["env"] = environment()
        rec["eval_images"] = a.eval_limit or 10000
        save_weights(load_model(run_dir / "model.safetensors"), out / f"{arm}.safetensors")
        atomic_write_json(out / f"{arm}.record.json", rec)
        print(f"== {arm}: {rec['final_acc']:.2f}%", file=sys.stderr, flush=True)


def cmd_measure(a: argparse.Namespace) -> None:
    import copy

    import torch

    import sparseforge as sf
    from sparseforge.models import load_model, model_spec
    from sparseforge.report.latency import measure, onnxruntime_session, torch_fused
    from sparseforge.report.plots import plt
    from sparseforge.data import BatchLoader, load_dataset, resolve_normalization
    from sparseforge.structured.prune import count_macs

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    _, test = load_dataset("cifar10", a.data_dir)
    if a.eval_limit:
        test = test.subset(a.eval_limit)
    test_batches = list(BatchLoader(test, 500, normalize=resolve_normalization("cifar10", "auto")).iterate(0))
    x = test_batches[0][0][:1].contiguous()
    arms, fns = {}, {}
    for arm in ARMS:
        path = out / f"{arm}.safetensors"
        if not path.exists():
            print(f"-- {arm}: not trained yet ({path} missing)", file=sys.stderr)
            continue
        model = load_model(path)
        folded = sf.reparameterize(copy.deepcopy(model)).eval()
        engine = sf.compile(folded, x, threads=a.threads)
        sess = onnxruntime_session(folded, x, a.threads)
        fused = torch_fused(folded)
        acc = {"pytorch": _accuracy(model, test_batches), "engine": _accuracy(engine, test_batches)}
        params = lambda m: sum(p.numel() for p in m.parameters())      # noqa: E731
        arms[arm] = {"model": model_spec(model), "acc": acc,
                     "params_train_form": params(model), "params_folded": params(folded),
                     "macs": count_macs(folded, x), "engine_fallbacks": [op["describe"] for op in engine.spec["ops"]
                                                                       if not op["native"]],
                     "record": json.loads((out / f"{arm}.record.json").read_text())}
        fns[f"{arm}/pytorch"] = (lambda f: lambda: f(x))(fused)
        fns[f"{arm}/sparseforge"] = (lambda e: lambda: e(x))(engine)
        if sess is not None:
            xn = x.numpy()
            fns[f"{arm}/onnxruntime-fp32"] = (lambda s: lambda: s.run(None, {"input": xn}))(sess)
    if not arms:
        sys.exit(f"repghost_cifar measure: no trained model in {out}; run `python bench/repghost_cifar.py train` first "
                 "(or pass --out to the directory that holds them)")
    lat = measure(fns, runs=a.runs)
    for arm in arms:
        arms[arm]["latency"] = {k.split("/", 1)[1]: v for k, v in lat.items() if k.startswith(arm + "/")}
    doc = {"benchmark": "repghost_cifar", "threads": a.threads, "runs": a.runs, "batch": 1,
           "eval_images": len(test), "arms": arms, "env": environment()}
    atomic_write_json(out / "repghost_cifar.json", doc)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for i, (arm, d) in enumerate(arms.items()):
        for j, (rt, v) in enumerate(d["latency"].items()):
            ax.scatter(v["median_ms"], d["acc"]["pytorch"], marker="os^"[j], color=f"C{i}",
                       label=f"{arm} {rt}")
    ax.set_xlabel(f"batch-1 latency, ms ({a.threads} threads, median of {a.runs})")
    ax.set_ylabel("CIFAR-10 test accuracy, %")
    ax.set_title(f"RepGhostNet 1.5x vs MobileNetV2, same budget: {doc['env']['cpu']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "repghost_cifar.png", dpi=110)
    for arm, d in arms.items():
        lat_s = ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in d["latency"].items())
        print(f"{arm:12s} acc {d['acc']['pytorch']:.2f}% (engine {d['acc']['engine']:.2f}%) params "
              f"{d['params_folded'] / 1e6:.2f} M  MACs {d['macs'] / 1e6:.1f} M  {lat_s}")


def _accuracy(fn, batches) -> float:
    import torch

    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            correct += int((fn(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--arms", default=",".join(ARMS))
    t.add_argument("--epochs", type=int, default=4, help="training epochs per arm (the budget)")
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--data-dir", default=str(SHARED / "data" / "cifar-10-batches-py"))
    t.add_argument("--out", default=str(OUT))
    t.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (smoke tests only)")
    t.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test images (smoke only)")
    m = sub.add_parser("measure")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--runs", type=int, default=50)
    m.add_argument("--data-dir", default=str(SHARED / "data" / "cifar-10-batches-py"))
    m.add_argument("--out", default=str(OUT))
    m.add_argument("--eval-limit", type=int, default=0, help="first N test images only (smoke tests)")
    a = ap.parse_args()
    {"train": cmd_train, "measure": cmd_measure}[a.cmd](a)


if __name__ == "__main__":
    main()
