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
  pattern-8x-gradual    one stage of E epochs with KD from the start: patterns at step 0, then the kernels kept
                        fall on the cubic schedule to 1/3.6 (global scope) over the first half, then train on
  pattern-4x-gradual    the same with connectivity 1.78x
  pattern-8x-cb2-gradual  pattern-8x-gradual with channel_block=2
  pattern-8x-cb16-gradual pattern-8x-gradual with channel_block=16 (blocks of 16 filters share patterns and kept
                        kernels: the engine runs them as 16-filter vectors on AVX-512 hosts; ResNet-20's 16-channel
                        layers then share one connectivity and pattern set per layer)
  pattern-8x-regrow     pattern-8x-gradual with dense shadow weights through the ramp (straight-through, SR-STE):
                        masks recomputed at every update, so patterns and kept kernels can change; frozen after
                        (measured: diverges at 8x, stopped after 6 epochs; log committed, no model)
  pattern-8x-energy-gradual  pattern-8x-gradual with connectivity_scope='energy': kernels compete by raw energy, so
                        layers keep the shares global magnitude pruning gives them (early 16-channel layers ~25%)
  pattern-2.25x-p12-gradual  pattern-2.25x-gradual with a 12-pattern library (one-shot + BN re-estimation on the
                        pretrained model: 68.3% vs 60.4% with 8 patterns)
  pattern-8x-ramp-gradual  pattern-8x-gradual with pattern_ramp (taps fall 9 -> 4 on the schedule: best-fit
                        pattern + the largest other taps, instead of the 2.25x cut at step 0)
  pattern-2.25x-ramp-gradual  pattern-2.25x-gradual with pattern_ramp
  pattern-2.25x-ramp-a05-gradual  pattern-2.25x-ramp-gradual with KD alpha 0.5 (half the loss on the labels): does
                        distilling from the 88.46% start hold the student below the fine-tuned control?
  pattern-2.25x-ramp30-gradual  pattern-2.25x-ramp-gradual with the cut over the first 30% of the epochs (6 of
                        20), 14 epochs of masked training after it instead of 10
  pattern-8x-ramp-p12-gradual / pattern-2.25x-ramp-p12-gradual  the ramp arms with a 12-pattern library
  magnitude-8x-gradual  the same stage with global unstructured magnitude at pattern-8x's weight count: the two
                        structures compared with one pipeline

Each arm is a resumable recipe run in bench/results/frontier/runs/<arm>/ (ignored: checkpoints); when it ends its
model goes to bench/results/frontier/<arm>.safetensors (committed: masks folded into the zeros, ~1.1 MB for
ResNet-20; the run directory keeps the full checkpoint) and its record (recipe, per-stage results, per-epoch metrics, timing) to <arm>.record.json (committed),
so the frontier's figures accumulate arm by arm across machines.

Train (two arms at a time, one thread each, in the background):
  python bench/frontier.py train --arms pattern-8x --threads 1 &
  python bench/frontier.py train --arms magnitude-8x --threads 1 &
Replicates with another data order and augmentation (seed 0 above), to tell a gap from seed noise:
  python bench/frontier.py train --arms control --seed 1 --out bench/results/frontier/seed1 &

Measure (quiet machine): every finished arm's accuracy on the full test set through PyTorch, the engine and
onnxruntime int8 (calibrated on 512 training images), and its batch-1 latency on every runtime it runs on
(PyTorch with BN folded, onnxruntime fp32 and int8, sparseforge.compile), all arms x runtimes alternating in one
process; writes frontier.json, frontier.png (accuracy vs latency) and the table of the fastest model within
0.5 / 1 / 2 pt of the dense control per runtime:
  python bench/frontier.py measure [--threads 2] [--runs 30] [--deepsparse-python VENV/bin/python]
  python bench/frontier.py table        # frontier.json as the README's markdown table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pattern_accuracy import matched_magnitude_sparsity  # bench/ is on sys.path when this script runs
from sparseforge import PatternConfig, create_model, load_weights
from sparseforge.recipe import Recipe, RecipeRunner, run_record
from sparseforge.report.env import environment
from sparseforge.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "bench" / "results" / "frontier"


def arm_stages(E: int, admm_epochs: int, weights: str) -> dict[str, list[dict]]:
    A = min(admm_epochs, E - 1)
    admm = {"rho": 5e-3, "rho_factor": 1.5, "rho_max": 1.0, "update_every": 100}
    kd = {"method": "kd", "teacher": "start", "T": 5.0, "alpha": 0.9}
    p8 = {"num_patterns": 8, "connectivity": "3.6x", "connectivity_scope": "global"}

    p225 = {"num_patterns": 8, "connectivity": 1.0}

    def pattern(target: dict) -> list[dict]:
        return [{"method": "admm", "epochs": A, **admm, "target": target}, {**kd, "epochs": E - A}]

    def gradual(**options) -> list[dict]:
        """One gradual stage of E epochs, KD from the start, the cut over the first half, masks every 100 steps."""
        return [{"method": "gradual", "epochs": E, "ramp": 0.5, "update_every": 100, "teacher": "start", **options}]

    return {
        "control": [{"method": "finetune", "epochs": E}],
        "magnitude-8x": [{"method": "magnitude", "sparsity": matched_magnitude_sparsity(weights, PatternConfig(**p8))},
                         {**kd, "epochs": E}],
        "pattern-2.25x": pattern(p225),
        "pattern-4x": pattern({"num_patterns": 8, "connectivity": "1.78x", "connectivity_scope": "global"}),
        "pattern-8x": pattern(p8),
        "pattern-8x-cb2": pattern({**p8, "channel_block": 2}),
        "structured-2x": [{"method": "structured", "mac_ratio": 0.5, "round_to": 8}, {**kd, "epochs": E}],
        "pattern-8x-gradual": gradual(target=p8),
        "pattern-2.25x-gradual": gradual(target=p225),
        "pattern-4x-gradual": gradual(target={**p8, "connectivity": "1.78x"}),
        "pattern-8x-cb2-gradual": gradual(target={**p8, "channel_block": 2}),
        "pattern-8x-cb16-gradual": gradual(target={**p8, "channel_block": 16}),
        "pattern-8x-regrow": gradual(regrow=True, target=p8),
        "pattern-8x-energy-gradual": gradual(target={**p8, "connectivity_scope": "energy"}),
        "pattern-2.25x-p12-gradual": gradual(target={**p225, "num_patterns": 12}),
        "pattern-8x-ramp-gradual": gradual(pattern_ramp=True, target=p8),
        "pattern-8x-ramp-p12-gradual": gradual(pattern_ramp=True, target={**p8, "num_patterns": 12}),
        "pattern-2.25x-ramp-gradual": gradual(pattern_ramp=True, target=p225),
        "pattern-2.25x-ramp-a05-gradual": gradual(pattern_ramp=True, target=p225, alpha=0.5),
        "pattern-2.25x-ramp30-gradual": [{**gradual(pattern_ramp=True, target=p225)[0], "ramp": 0.3}],
        # ramp 0.3 lost 0.22 pt to ramp 0.5 at 2.25x (session 29): does a longer ramp gain?
        "pattern-2.25x-ramp70-gradual": [{**gradual(pattern_ramp=True, target=p225)[0], "ramp": 0.7}],
        "pattern-8x-ramp70-gradual": [{**gradual(pattern_ramp=True, target=p8)[0], "ramp": 0.7}],
        # the two best ramps with a 12-pattern library (one-shot on the pretrained model it kept 68.3% vs 60.4%)
        "pattern-2.25x-ramp-p12-gradual": gradual(pattern_ramp=True, target={**p225, "num_patterns": 12}),
        "pattern-8x-ramp-mag-gradual": gradual(pattern_ramp=True, target={**p8, "connectivity_scope": "magnitude"}),
        "magnitude-8x-gradual": gradual(magnitude=matched_magnitude_sparsity(weights, PatternConfig(**p8))),
    }


def record_arm(run_dir: Path, arm: str, budget: dict) -> dict:
    """The arm's recipe, per-stage results and per-epoch metrics: small, committed beside its model."""
    rec: dict = {"arm": arm, "budget": budget, **run_record(run_dir)}
    if rec["finished"]:
        res = json.loads((run_dir / "results.json").read_text())
        rec["final_acc"] = res["final"]["acc"]
        rec["sparsity"] = res.get("sparsity")
    return rec


def cmd_train(a: argparse.Namespace) -> None:
    stages = arm_stages(a.epochs, a.admm_epochs, a.weights)
    train = {"batch_size": 128, "lr": a.lr, "schedule": "onecycle", "optimizer": "sgd", "momentum": 0.9,
             "nesterov": True, "weight_decay": 1e-4, "threads": a.threads, "channels_last": True,
             "max_steps_per_epoch": a.max_steps, "seed": a.seed}
    out = Path(a.out)
    for arm in [s for s in a.arms.split(",") if s]:
        if arm not in stages:
            sys.exit(f"unknown arm {arm!r}: choose from {', '.join(stages)}")
        recipe = Recipe.from_dict({"model": "resnet20", "weights": a.weights, "dataset": "cifar10",
                                   "data_dir": a.data_dir, "train": train, "stage": stages[arm]})
        run_dir = out / "runs" / arm
        seed_from_snapshot(snapshot_dir(a) / arm, arm, run_dir)
        budget = {"epochs": a.epochs, "admm_epochs": a.admm_epochs, "lr": a.lr, "schedule": "onecycle per stage",
                  "batch_size": 128, "threads": a.threads, "seed": a.seed}
        print(f"== arm {arm}: {stages[arm]}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        RecipeRunner(recipe, run_dir, progress=False, eval_limit=a.eval_limit).run(
            resume=(run_dir / "recipe.toml").exists())
        rec = record_arm(run_dir, arm, budget)
        rec["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)
        rec["env"] = environment()
        rec["eval_images"] = a.eval_limit or 10000
        write_arm_model(run_dir / "model.safetensors", out / f"{arm}.safetensors")
        atomic_write_json(out / f"{arm}.record.json", rec)
        print(f"== {arm}: {rec['final_acc']:.2f}%", file=sys.stderr, flush=True)


# resumable copies of unfinished arms' run directories live outside the repository (checkpoints are weights):
# <SNAPSHOTS>/<out folder name>/<arm>; --snapshots moves them
SNAPSHOTS = ROOT.parent / "frontier-snapshots"


def snapshot_dir(a: argparse.Namespace) -> Path:
    return Path(a.snapshots) / Path(a.out).resolve().name


def cmd_snapshot(a: argparse.Namespace) -> None:
    """Copy each unfinished arm's run directory, its latest checkpoint only (ResNet-20 ~3.3 MB), to the snapshot
    folder outside the repository, so an arm longer than one session continues in the next run of ``train`` (which
    seeds a missing runs/<arm> from it) wherever that folder survives. Copies go to a temporary folder first and
    replace the old snapshot whole, so a snapshot is never half written."""
    import shutil

    from sparseforge import rundir

    out = Path(a.out)
    for arm in [s for s in a.arms.split(",") if s]:
        src = out / "runs" / arm
        if not (src / rundir.RECIPE).exists():
            sys.exit(f"{src} holds no run to snapshot")
        tmp = snapshot_dir(a) / f".{arm}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for f in src.rglob("*"):
            if f.is_dir() or f.name == ".lock":
                continue
            rel = f.relative_to(src)
            if rel.parent.name == rundir.CHECKPOINTS:
                latest = json.loads((f.parent / rundir.LATEST).read_text())["tag"]
                if f.name != rundir.LATEST and not f.name.startswith(latest + "."):
                    continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, tmp / rel)
        dst = snapshot_dir(a) / arm
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
        print(f"{arm}: snapshot in {dst} ({sum(f.stat().st_size for f in dst.rglob('*') if f.is_file()) / 1e6:.1f} MB)",
              file=sys.stderr)


def seed_from_snapshot(snap: Path, arm: str, run_dir: Path) -> None:
    """A missing runs/<arm> starts from the arm's snapshot when there is one."""
    import shutil

    if not run_dir.exists() and snap.is_dir():
        shutil.copytree(snap, run_dir)
        print(f"== {arm}: continuing from the snapshot in {snap}", file=sys.stderr, flush=True)


RUNTIMES = ("pytorch", "onnxruntime-fp32", "onnxruntime-int8", "sparseforge", "sparseforge-int8", "deepsparse")


def write_arm_model(src: Path, dst: Path) -> None:
    """The committed copy of an arm's model: masks folded into the weights (a pruned weight is an exact 0, which
    is all evaluation and the engine read), so a ResNet-20 arm is ~1.1 MB instead of 2.2 MB with its masks."""
    from sparseforge.models import save_weights
    from sparseforge.sparsity.mask import fold_masks

    model = fold_masks(load_arm(src))
    save_weights(model, dst)


def load_arm(path: Path):
    """The model an arm saved (architecture from its metadata: a structurally pruned arm rebuilds its widths)."""
    from sparseforge.models import load_model

    return load_model(path)


def cmd_measure(a: argparse.Namespace) -> None:
    import torch

    import sparseforge as sf
    from sparseforge.data import BatchLoader, load_dataset, resolve_normalization
    from sparseforge.report.latency import measure, onnxruntime_int8_session, onnxruntime_session, torch_fused
    from sparseforge.train import evaluate

    from sparseforge.engine.int8 import Int8Engine

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    train_ds, test = load_dataset("cifar10", a.data_dir)
    if a.eval_limit:
        test = test.subset(a.eval_limit)
    norm = resolve_normalization("cifar10", "auto")
    test_batches = list(BatchLoader(test, 500, normalize=norm).iterate(0))
    calib = [x for x, _ in BatchLoader(train_ds.subset(512), 1, normalize=norm).iterate(0)]
    calib_pairs = list(BatchLoader(train_ds.subset(512), 128, normalize=norm).iterate(0))
    arms: dict[str, torch.nn.Module] = {}
    records: dict[str, dict] = {}
    start = create_model("resnet20")
    load_weights(start, a.weights)
    arms["pretrained-start"] = start.eval()
    records["pretrained-start"] = {"note": "the shared pretrained model, 0 epochs of the budget (not a control)"}
    for rec_path in sorted(out.glob("*.record.json")):
        rec = json.loads(rec_path.read_text())
        model_path = out / f"{rec['arm']}.safetensors"
        if rec.get("finished") and model_path.exists() and (not a.arms or rec["arm"] in a.arms.split(",")):
            arms[rec["arm"]] = load_arm(model_path)
            records[rec["arm"]] = rec
    x1 = test_batches[0][0][:1].contiguous()
    rows: dict[str, dict] = {}
    fns = {}
    for name, model in arms.items():
        r = rows[name] = {"runtimes": {}}
        with torch.inference_mode():
            r["acc_pytorch"] = evaluate(model, BatchLoader(test, 500, normalize=norm))["acc"]
        engine = sf.compile(model, x1, threads=a.threads)
        sess = onnxruntime_session(model, x1, a.threads)
        sess8 = onnxruntime_int8_session(model, x1, a.threads, calibration=calib)
        fused = torch_fused(model)
        # the int8 engine: post-training int8 of this arm (sparseforge.quantize, auto calibration on the same 512
        # training images, labelled), its convs in the int8 kernel, the rest through the integer reference
        qm = sf.quantize(model, sf.Int8Config(), calibration=calib_pairs)
        eng8 = Int8Engine(qm, threads=a.threads)
        r["int8_calibration"] = qm.qgraph.method
        correct_e = correct_8 = correct_e8 = total = 0
        with torch.inference_mode():
            for x, y in test_batches:
                correct_e += int((engine(x).argmax(1) == y).sum())
                correct_e8 += int((eng8(x).argmax(1) == y).sum())
                if sess8 is not None:
                    correct_8 += int((torch.from_numpy(sess8.run(None, {"input": x.numpy()})[0]).argmax(1) == y).sum())
                total += len(y)
        r["acc_sparseforge"] = 100.0 * correct_e / total
        r["acc_sparseforge-int8"] = 100.0 * correct_e8 / total
        r["engine_fallbacks"] = [op["describe"] for op in engine.spec["ops"] if not op["native"]]
        xn = x1.numpy()
        fns[(name, "pytorch")] = lambda m=fused: m(x1)
        fns[(name, "sparseforge")] = lambda e=engine: e(x1)
        fns[(name, "sparseforge-int8")] = lambda e=eng8: e(x1)
        if sess is not None:
            fns[(name, "onnxruntime-fp32")] = lambda s_=sess: s_.run(None, {"input": xn})
        if sess8 is not None:
            r["acc_onnxruntime-int8"] = 100.0 * correct_8 / total
            fns[(name, "onnxruntime-int8")] = lambda s_=sess8: s_.run(None, {"input": xn})
        print(f"{name}: acc pytorch {r['acc_pytorch']:.2f} engine {r['acc_sparseforge']:.2f} int8 engine "
              f"{r['acc_sparseforge-int8']:.2f} "
              f"ort-int8 {r.get('acc_onnxruntime-int8', float('nan')):.2f}", flush=True)
    keys = list(fns)
    lat = measure({f"{n}|{rt}": fns[(n, rt)] for n, rt in keys}, runs=a.runs)
    for n, rt in keys:
        acc = rows[n][f"acc_{rt}"] if rt in ("onnxruntime-int8", "sparseforge", "sparseforge-int8") else \
            rows[n]["acc_pytorch"]
        rows[n]["runtimes"][rt] = {**lat[f"{n}|{rt}"], "acc": acc}
    if a.deepsparse_python:
        # DeepSparse 1.8 pins old numpy/onnx: it runs the unstructured arms' fp32 ONNX in its own venv, in a
        # separate process (so not alternating with the others); accuracy is the fp32 model's
        from engine_speed import deepsparse_time

        for n in [n for n in rows if n.startswith("magnitude")]:
            res = deepsparse_time(a.deepsparse_python, arms[n], 1, a.threads, a.runs)
            if "error" in res:
                print(f"{n}: deepsparse failed: {res['error']}", flush=True)
                continue
            rows[n]["runtimes"]["deepsparse"] = {**{k: res[k] for k in ("median_ms", "p10_ms", "p90_ms") if k in res},
                                                 "acc": rows[n]["acc_pytorch"], "separate_process": True,
                                                 "version": res.get("version")}
    ref_name = "control" if "control" in rows else "pretrained-start"
    ref_acc = rows[ref_name]["acc_pytorch"]
    dense_ms = {rt: rows[ref_name]["runtimes"][rt]["median_ms"] for rt in rows[ref_name]["runtimes"]}
    table = {}
    for tol in (0.5, 1.0, 2.0):
        per_rt = {}
        for rt in RUNTIMES:
            ok = [(rows[n]["runtimes"][rt]["median_ms"], n) for n in rows
                  if rt in rows[n]["runtimes"] and rows[n]["runtimes"][rt]["acc"] >= ref_acc - tol]
            if ok:
                ms, n = min(ok)
                per_rt[rt] = {"arm": n, "median_ms": ms, "acc": rows[n]["runtimes"][rt]["acc"]}
        best = min(per_rt.items(), key=lambda kv: kv[1]["median_ms"]) if per_rt else None
        table[f"within_{tol}_pt"] = {"per_runtime": per_rt, "fastest": best[0] if best else None,
                                     "vs_dense_runtimes": {rt: ms / best[1]["median_ms"] for rt, ms in dense_ms.items()}
                                     if best else {}}
    doc = {"benchmark": "frontier", "model": "resnet20", "reference": ref_name, "reference_acc": ref_acc,
           "reference_note": "" if ref_name == "control" else
           "the same-budget dense control is not trained yet: the pretrained start stands in for it",
           "batch": 1, "threads": a.threads, "runs": a.runs, "arms": rows,
           "records": {n: {k: v for k, v in r.items() if k in ("budget", "final_acc", "sparsity", "note")}
                       for n, r in records.items()},
           "table": table, "env": environment()}
    atomic_write_json(out / "frontier.json", doc)
    plot_frontier(doc, out / "frontier.png")
    for k, v in table.items():
        print(k, json.dumps(v))


def plot_frontier(doc: dict, path: Path) -> None:
    """Accuracy vs batch-1 latency: one colour per arm, one marker per runtime (legends outside the axes, so no
    point is hidden), the reference - 1 pt dashed."""
    from sparseforge.report.plots import plt

    markers = {"pytorch": "o", "onnxruntime-fp32": "s", "onnxruntime-int8": "D", "sparseforge": "*",
               "sparseforge-int8": "P", "deepsparse": "^"}
    rows = doc["arms"]
    fig, ax = plt.subplots(figsize=(11, 5.2))
    colors = list(plt.cm.tab10.colors) + list(plt.cm.Dark2.colors)      # 18 distinct, saturated colours
    arm_handles = []
    for i, (n, r) in enumerate(sorted(rows.items(), key=lambda kv: -kv[1]["acc_pytorch"])):
        c = colors[i % len(colors)]
        for rt, v in r["runtimes"].items():
            ax.scatter(v["median_ms"], v["acc"], marker=markers[rt], color=c, s=90 if rt == "sparseforge" else 40,
                       edgecolors="black" if rt == "sparseforge" else "none", linewidths=0.5)
        arm_handles.append(ax.scatter([], [], marker="o", color=c, label=n))
    rt_handles = [ax.scatter([], [], marker=mk, color="black", label=rt) for rt, mk in markers.items()
                  if any(rt in r["runtimes"] for r in rows.values())]
    ax.axhline(doc["reference_acc"] - 1.0, color="#999", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency, batch 1, {doc['threads']} threads (ms, median of {doc['runs']}; log scale)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_title(f"ResNet-20 frontier: same training budget per arm; dashed: {doc['reference']} - 1 pt; "
                 f"{doc['env'].get('cpu', '?')}", fontsize=9)
    first = ax.legend(handles=arm_handles, fontsize=7, title="arm", title_fontsize=7, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(handles=rt_handles, fontsize=7, title="runtime", title_fontsize=7, loc="lower left",
              bbox_to_anchor=(1.01, 0.0))
    fig.subplots_adjust(left=0.07, right=0.78, bottom=0.11, top=0.93)    # room for the legends outside the axes
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_table(a: argparse.Namespace) -> None:
    """frontier.json as markdown (the README's frontier table): per arm, accuracy and median batch-1 latency on
    each runtime, then the fastest model within 0.5 / 1 / 2 pt of the reference."""
    doc = json.loads((Path(a.out) / "frontier.json").read_text())
    if a.plot:
        plot_frontier(doc, Path(a.out) / "frontier.png")
    rts = [rt for rt in RUNTIMES if any(rt in r["runtimes"] for r in doc["arms"].values())]
    env = doc["env"]
    lines = [f"ResNet-20, CIFAR-10 (shared JPEG copy, 10,000 test images); batch 1, {doc['threads']} threads, "
             f"{doc['runs']} alternating runs, median; {env.get('cpu', '?')}, torch {env.get('torch', '?')}, "
             f"onnxruntime {env.get('onnxruntime', '?')}. Accuracy (%) / latency (ms) per runtime "
             "(int8 runtimes: their own accuracy).", "",
             "| arm | " + " | ".join(rts) + " |", "|---|" + "---|" * len(rts)]
    for n, r in sorted(doc["arms"].items(), key=lambda kv: -kv[1]["acc_pytorch"]):
        cells = [f"{r['runtimes'][rt]['acc']:.2f} / {r['runtimes'][rt]['median_ms']:.2f}" if rt in r["runtimes"]
                 else "-" for rt in rts]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Fastest within a tolerance of `{doc['reference']}` ({doc['reference_acc']:.2f}%):", "",
              "| tolerance | fastest (arm on runtime, ms) | vs the reference on onnxruntime fp32 / int8 |",
              "|---|---|---|"]
    for k, v in doc["table"].items():
        if not v["fastest"]:
            continue
        best = v["per_runtime"][v["fastest"]]
        vs = v["vs_dense_runtimes"]
        lines.append(f"| {k.split('_')[1]} pt | {best['arm']} on {v['fastest']}, {best['median_ms']:.3f} "
                     f"({best['acc']:.2f}%) | {vs.get('onnxruntime-fp32', float('nan')):.2f}x / "
                     f"{vs.get('onnxruntime-int8', float('nan')):.2f}x |")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train arms (resumable) and commit-ready outputs")
    t.add_argument("--arms", required=True, help="comma-separated arm names")
    t.add_argument("--epochs", type=int, default=20, help="training epochs per arm (the budget)")
    t.add_argument("--admm-epochs", type=int, default=8, help="of which ADMM, for the pattern arms")
    t.add_argument("--lr", type=float, default=0.02)
    t.add_argument("--seed", type=int, default=0, help="data order and augmentation (replicates: another --out, e.g. "
                                                       "bench/results/frontier/seed1)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--data-dir", default=str(SHARED / "data" / "cifar-10-batches-py"))
    t.add_argument("--weights", default=str(SHARED / "models" / "resnet20-cifar10jpeg.safetensors"))
    t.add_argument("--out", default=str(OUT))
    t.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (smoke tests only)")
    t.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test images (smoke only)")
    t.add_argument("--snapshots", default=str(SNAPSHOTS), help="where snapshots of unfinished arms are")
    m = sub.add_parser("measure", help="accuracy and latency of every finished arm, side by side")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--runs", type=int, default=30)
    m.add_argument("--deepsparse-python", default="", help="DeepSparse 1.8 venv's python: also time the magnitude "
                                                           "arms there (e.g. /work/dsvenv/bin/python)")
    m.add_argument("--data-dir", default=str(SHARED / "data" / "cifar-10-batches-py"))
    m.add_argument("--weights", default=str(SHARED / "models" / "resnet20-cifar10jpeg.safetensors"))
    m.add_argument("--out", default=str(OUT))
    m.add_argument("--arms", default="", help="only these finished arms (comma-separated; default all)")
    m.add_argument("--eval-limit", type=int, default=0, help="first N test images only (smoke tests)")
    sn = sub.add_parser("snapshot", help="resumable copies of unfinished arms (latest checkpoint), outside the repository")
    sn.add_argument("--arms", required=True, help="comma-separated arm names")
    sn.add_argument("--out", default=str(OUT))
    sn.add_argument("--snapshots", default=str(SNAPSHOTS), help="outside the repository (weights)")
    tb = sub.add_parser("table", help="frontier.json as the README's markdown table")
    tb.add_argument("--out", default=str(OUT))
    tb.add_argument("--plot", action="store_true", help="also redraw frontier.png from frontier.json")
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    {"train": cmd_train, "measure": cmd_measure, "table": cmd_table, "snapshot": cmd_snapshot}[a.cmd](a)


if __name__ == "__main__":
    main()
