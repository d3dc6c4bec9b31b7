"""Structured pruning on the shared CIFAR-10 data: accuracy vs a same-budget dense control, measured latency.

Experiments (each arm is a resumable recipe run under bench/results/structured/<experiment>/<arm>/):

  resnet56   start: ../shared/models/akamaster_resnet56 (BSD-2). Arms, E epochs of fine-tuning each:
               control      dense fine-tuning
               l1-2x        StructuredConfig(mac_ratio=0.48, importance="l1") -> fine-tune
               taylor-2x    StructuredConfig(mac_ratio=0.48, importance="taylor") -> fine-tune   (--arms)
               adapt-kd-2.2x  E/4 epochs dense fine-tune -> StructuredConfig(mac_ratio=0.45, round_to=8,
                            scope="layer") -> KD from the stage-0 dense model for the remaining epochs   (--arms)
               depth-kd-2x  E/4 epochs dense fine-tune -> DepthConfig(mac_ratio=0.5, importance="loss") (whole
                            residual branches dropped) -> KD from the stage-0 model   (--arms; also depth-hint-2x,
                            depth-iter-kd-2x, depth-hint-half, depth-kd-lr{05,01,1}-2x: see the arms table below)
               depth-grow-2x  E/4 dense -> the same blocks fade out (growing L2 on their last BN) for E/4 epochs on
                            the labels -> dropped -> fine-tune (also depth-grow-kd-2x, depth-grow0-2x,
                            depth-grow-half)
               depth-inplace-2x  the same blocks chosen on the start model; all E epochs train the full net on the
                            labels and, with shared weights, the shallow net on the full net's soft outputs
                            (in-place distillation); then the branches are dropped
             then PyTorch latency (BN folded, eval, inference_mode, 2 threads) at batch 1 and 32 of the pruned
             vs the unpruned network, alternating in one process with a pause between blocks, >= 30 runs, and
             the same through sparseforge.compile.
             References (--arms ref-resnet32,ref-resnet20): the zoo's smaller dense ResNets fine-tuned for E epochs.
  ssl        start: ../shared/models/resnet20-cifar10jpeg.safetensors. control: E epochs; ssl: E-1 epochs of
             group lasso (filter, channel, depth; proximal steps, lambda 0.05) -> removal of groups with norm
             < 1e-3 -> 1 epoch fine-tune. Group norms per epoch plotted.

Run: python bench/structured.py --experiment resnet56 --epochs 2 ; python bench/structured.py --experiment ssl
Writes bench/results/structured/<experiment>.json and .png.
On a GPU (training only; latency is measured on the CPU afterwards with --from-records):
  python bench/structured.py --experiment resnet56 --epochs 64 --device cuda --precision bf16 \
      --data-dir ../shared/data/cifar10-jpeg.npz --arms control,depth-kd-2x,depth-kd-online-2x --train-only
(the .npz is the same data as the python batches, 56 MB: small enough to carry to another machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.fx.experimental.optimization as fx_opt

import sparseforge as sf
from sparseforge.models import load_weights, model_from_spec, read_state_dict
from sparseforge.recipe import Recipe, RecipeRunner, run_record
from sparseforge.report.env import environment
from sparseforge.report.latency import measure
from sparseforge.report.plots import plt
from sparseforge.structured import count_macs, count_params
from sparseforge.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "bench" / "results" / "structured"


def recipe(model: str, weights: str, data_dir: str, stages: list[dict], epochs_train: dict) -> Recipe:
    return Recipe.from_dict({
        "model": model, "weights": weights, "dataset": "cifar10", "data_dir": data_dir,
        "train": {"batch_size": 128, "lr": 0.02, "schedule": "cosine", "weight_decay": 5e-4, "threads": 2,
                  **epochs_train},
        "stage": stages})


def _setup(rc: Recipe) -> dict:
    """A recipe without its stages, thread count, torch.compile switch and device (they change the speed, not what
    is computed, up to float summation order)."""
    d = {k: v for k, v in rc.to_dict().items() if k != "stage"}
    d["train"] = {k: v for k, v in d.get("train", {}).items() if k not in ("threads", "compile", "device")}
    return d


def reuse_stages(rc: Recipe, d: Path, exp_dir: Path) -> None:
    """Arms that start with the same stages (e.g. the dense adaptation epochs, then the same depth pruning) share
    them: a new arm copies the longest finished identical prefix of stages from another arm of this or another
    budget of the experiment (e.g. the 8-epoch control is stage 0 of a 16-epoch arm that prunes after 8 epochs)
    instead of computing it again (same recipe settings and seed)."""
    import shutil

    if (d / "recipe.toml").exists():
        return
    mine = rc.stages()
    best: tuple[int, Path | None] = (0, None)
    # this budget's arms first (on a tie they win: numerics differ slightly between runs with other thread counts
    # or code versions, and arms compared with each other should share the very same stage 0)
    exps = ([exp_dir] if exp_dir.is_dir() else []) + [e for e in sorted(exp_dir.parent.glob(exp_dir.name.split("-")[0] + "*"))
                        if e.is_dir() and e != exp_dir]
    siblings = [p for e in exps for p in sorted(e.iterdir()) if p.is_dir() and p != d]
    for other in siblings:
        try:
            orc = Recipe.from_toml((other / "recipe.toml").read_text())
        except (OSError, ValueError, sf.SparseforgeError):
            continue
        if _setup(orc) != _setup(rc):
            continue
        n = 0
        for i, (a_, b_) in enumerate(zip(orc.stages(), mine)):
            if a_ != b_ or not (other / "stages" / f"{i:02d}-{a_.method}" / "done.json").exists():
                break
            n = i + 1
        if n > best[0]:
            best = (n, other)
    n, other = best
    if other is None:
        return
    for i in range(n):
        src = other / "stages" / f"{i:02d}-{mine[i].method}"
        shutil.copytree(src, d / "stages" / src.name)
    shutil.copy(other / "start.json", d / "start.json")
    print(f"{d.name}: stages 0-{n - 1} ({', '.join(s.method for s in mine[:n])}) copied from "
          f"{other.parent.name}/{other.name}", flush=True)


def run_arm(name: str, rc: Recipe, exp_dir: Path) -> dict:
    d = exp_dir / name
    saved = d / "recipe.toml"
    if saved.exists():       # a finished / interrupted arm resumes with the thread count it was trained with
        orc = Recipe.from_toml(saved.read_text())
        if _setup(orc) == _setup(rc) and orc.stages() == rc.stages():
            rc = orc
    reuse_stages(rc, d, exp_dir)
    t0 = time.perf_counter()
    res = RecipeRunner(rc, d, progress=False).run(resume=(d / "recipe.toml").exists())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def record_arm(d: Path) -> dict | None:
    """What an arm measured, in one small committed file beside its (ignored, multi-MB) run directory.

    Run directories hold weights and checkpoints and are not committed, so a new machine starts without them: the
    record keeps the recipe, every stage's result and per-epoch metrics and the final architecture (block list and
    widths, enough to rebuild the network for latency), also for an arm still training (``--record``)."""
    if not (d / "recipe.toml").exists():
        return None
    rec: dict = {"arm": d.name, **run_record(d)}
    if rec["finished"]:
        rec["final_acc"] = rec["stages"][-1]["result"]["eval"]["acc"] if rec["stages"] else rec["start"]["acc"]
        rec["model_spec"] = json.loads(read_state_dict(d / "model.safetensors")[1]["model"])
    atomic_write_json(d.parent / f"{d.name}.record.json", rec)
    return rec


def load_final(run_dir: Path) -> torch.nn.Module:
    p = run_dir / "model.safetensors"
    return load_weights(model_from_spec(json.loads(read_state_dict(p)[1]["model"])), p).eval()


def _channels_last(m: torch.nn.Module):
    m = m.to(memory_format=torch.channels_last)
    return lambda x: m(x.contiguous(memory_format=torch.channels_last))


def latency(models: dict[str, torch.nn.Module], batch: int, runs: int, block: int = 5) -> dict:
    x = torch.randn(batch, 3, 32, 32)
    fns = {}
    for k, m in models.items():
        fused = fx_opt.fuse(copy.deepcopy(m).eval())
        fns[f"torch:{k}"] = fused
        fns[f"torch-cl:{k}"] = _channels_last(fx_opt.fuse(copy.deepcopy(m).eval()))
        fns[f"sparseforge:{k}"] = sf.compile(m, x[:1], threads=2)
    res = measure({k: (lambda f=f: f(x)) for k, f in fns.items()}, runs=runs, block=block, keep_times=True)
    times = {k: v.pop("times_ms") for k, v in res.items()}
    out = res
    # paired speedups: the machine's speed drifts between rounds (other tenants, cache state), so compare the
    # arms round by round (median of each round's block) and report the median and spread of those ratios
    base = next(iter(models))
    for k in times:
        kind, arm = k.split(":", 1)
        if arm == base:
            continue
        ref = f"{kind}:{base}"
        rounds = [statistics.median(times[ref][i:i + block]) / statistics.median(times[k][i:i + block])
                  for i in range(0, min(len(times[ref]), len(times[k])), block)]
        out[k]["paired_speedup_vs_" + base] = {"median": statistics.median(rounds),
                                               "p10": float(np.percentile(rounds, 10)),
                                               "p90": float(np.percentile(rounds, 90)), "rounds": len(rounds)}
    return out


def _prec(a) -> str:
    """bf16-trained arms live in their own directories and JSON: they are compared with a bf16 control only."""
    return "" if a.precision == "fp32" else f"-{a.precision}"


def _prec_train(a) -> dict:
    return (({} if a.precision == "fp32" else {"precision": a.precision}) | ({"compile": True} if a.compile else {})
            | ({} if a.device == "auto" else {"device": a.device}))


def exp_resnet56(a) -> dict:
    w = str(SHARED / "models" / "akamaster_resnet56-4bfd9763.th")
    exp = OUT / (("resnet56" if a.epochs == 2 else f"resnet56-e{a.epochs}") + _prec(a))
    arms = {
        "control": [{"method": "finetune", "epochs": a.epochs}],
        "l1-2x": [{"method": "structured", "mac_ratio": 0.48, "importance": "l1"},
                  {"method": "finetune", "epochs": a.epochs}],
        "taylor-2x": [{"method": "structured", "mac_ratio": 0.48, "importance": "taylor"},
                      {"method": "finetune", "epochs": a.epochs}],
        # widths kept at multiples of 8: oneDNN runs odd widths (7, 11, 12 channels) poorly at batch 32
        "l1-2x-r8": [{"method": "structured", "mac_ratio": 0.48, "importance": "l1", "round_to": 8},
                     {"method": "finetune", "epochs": a.epochs}],
        # growing regularisation: 1 epoch fading the chosen channels, remove, E-1 epochs fine-tuning (same budget
        # as the control); widths multiples of 8, the same share removed in every group (oneDNN-friendly)
        "grow-2x-r8-global": [{"method": "structured", "mac_ratio": 0.48, "importance": "l1", "round_to": 8,
                               "regularize_epochs": 1},
                              {"method": "finetune", "epochs": max(1, a.epochs - 1)}],
        # train -> prune -> fine-tune in the same epoch budget as the control: E/4 epochs dense (the data here is
        # JPEG-decoded, so the pretrained net first adapts), remove 55% of the MACs (per-layer, widths multiples
        # of 8: the widths oneDNN runs well), then distil from that dense model (stage 0) for the rest
        "adapt-kd-2.2x": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                          {"method": "structured", "mac_ratio": 0.45, "importance": "l1", "round_to": 8,
                           "scope": "layer"},
                          {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 4)), "teacher": "stage:0"}],
        # layer pruning: the same budget and teacher as adapt-kd-2.2x, but whole residual branches are dropped
        # (greedy, by the loss increase on 4 training batches) until <= 0.5 of the MACs remain: narrow layers run
        # far below peak, so a dropped block saves its whole time where a thinned one saves little
        "depth-kd-2x": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                        {"method": "depth", "mac_ratio": 0.5, "importance": "loss"},
                        {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 4)), "teacher": "stage:0"}],
        # the same, plus FitNets hints: depth pruning keeps every width, so the student's stage outputs can be
        # matched to the teacher's directly (relative squared error, weight 1) on top of Hinton KD
        "depth-hint-2x": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                          {"method": "depth", "mac_ratio": 0.5, "importance": "loss"},
                          {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 4)), "teacher": "stage:0",
                           "hint": 1.0, "taps": ["layer1", "layer2", "layer3"]}],
        # half the budget dense (the teacher: for E=16 that is exactly the 8-epoch control), then depth pruning
        # and KD + hints for the other half
        "depth-hint-half": [{"method": "finetune", "epochs": max(1, a.epochs // 2)},
                            {"method": "depth", "mac_ratio": 0.5, "importance": "loss"},
                            {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 2)),
                             "teacher": "stage:0", "hint": 1.0, "taps": ["layer1", "layer2", "layer3"]}],
        # iterative: half the blocks, KD, the other half, KD (each cut does less damage, the net recovers in between);
        # 14 of ResNet-56's 25 droppable blocks (all of equal MACs) = 0.474 of the MACs, as depth-kd-2x
        "depth-iter-kd-2x": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                             {"method": "depth", "blocks": 7, "importance": "loss"},
                             {"method": "kd", "epochs": max(1, (a.epochs - max(1, a.epochs // 4)) // 3),
                              "teacher": "stage:0"},
                             {"method": "depth", "blocks": 7, "importance": "loss"},
                             {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 4)
                                                         - max(1, (a.epochs - max(1, a.epochs // 4)) // 3)),
                              "teacher": "stage:0"}],
        # depth-kd-2x with half the weight on the labels (the 2-epoch teacher caps a student that mostly imitates it)
        "depth-kd-a05-2x": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                            {"method": "depth", "mac_ratio": 0.5, "importance": "loss"},
                            {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 4)), "teacher": "stage:0",
                             "alpha": 0.5}],
        # growing regularisation for whole blocks: the same blocks chosen as depth-kd-2x's after the dense epochs,
        # but their branches fade out (growing L2 on their last BN) for E/4 epochs while the rest of the net adapts on
        # the labels, then they are dropped and the shallow net fine-tunes on the labels (no teacher to cap it)
        "depth-grow-2x": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                          {"method": "depth", "mac_ratio": 0.5, "importance": "loss",
                           "regularize_epochs": max(1, a.epochs // 4)},
                          {"method": "finetune", "epochs": max(1, a.epochs - 2 * max(1, a.epochs // 4))}],
        # the same, distilling from the stage-0 dense model after the drop
        "depth-grow-kd-2x": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                             {"method": "depth", "mac_ratio": 0.5, "importance": "loss",
                              "regularize_epochs": max(1, a.epochs // 4)},
                             {"method": "kd", "epochs": max(1, a.epochs - 2 * max(1, a.epochs // 4)),
                              "teacher": "stage:0"}],
        # fading from the start (blocks chosen on the pretrained net): E/4 epochs fading at full depth, the rest shallow
        "depth-grow0-2x": [{"method": "depth", "mac_ratio": 0.5, "importance": "loss",
                            "regularize_epochs": max(1, a.epochs // 4)},
                           {"method": "finetune", "epochs": max(1, a.epochs - max(1, a.epochs // 4))}],
        # half the budget dense (for E=16: the 8-epoch control is the teacher), then the chosen blocks fade out for
        # E/8 epochs (no abrupt cut: depth-hint-half's cut of a longer-trained net left 26%), then KD for the rest
        "depth-grow-half": [{"method": "finetune", "epochs": max(1, a.epochs // 2)},
                            {"method": "depth", "mac_ratio": 0.5, "importance": "loss",
                             "regularize_epochs": max(1, a.epochs // 8)},
                            {"method": "kd", "epochs": max(1, a.epochs - a.epochs // 2 - max(1, a.epochs // 8)),
                             "teacher": "stage:0"}],
        # depth-kd-2x with another learning rate for the KD stage (the student, at 54% after the cut, re-learns at the
        # stage's own cosine schedule: is 0.02 too small to reorganise, or too large to stay near the teacher?)
        **{f"depth-kd-lr{tag}-2x": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                                    {"method": "depth", "mac_ratio": 0.5, "importance": "loss"},
                                    {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 4)),
                                     "teacher": "stage:0", "train": {"lr": lr}}]
           for tag, lr in (("05", 0.05), ("01", 0.01), ("1", 0.1))},
        # half the budget dense (the teacher), cut, KD for the other half at a lower learning rate
        "depth-kd-half-lr01": [{"method": "finetune", "epochs": max(1, a.epochs // 2)},
                               {"method": "depth", "mac_ratio": 0.5, "importance": "loss"},
                               {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 2)),
                                "teacher": "stage:0", "train": {"lr": 0.01}}],
        # in-place distillation: the blocks are chosen on the start model, then for all E epochs every step trains the
        # full net on the labels and the shallow sub-network (same weights, those branches skipped) on the full net's
        # soft outputs (T 5, alpha 0.9, as the KD arms); then the branches are dropped. Teacher and student both
        # train for the whole budget (depth-kd-2x's teacher gets E/4 epochs, its student 3E/4); a step costs ~1.5x
        # a dense step
        "depth-inplace-2x": [{"method": "depth", "mac_ratio": 0.5, "importance": "loss", "inplace_epochs": a.epochs}],
        # the same with the shallow net's loss weight rising from 0 to 1 over the first half of the budget (at full
        # weight from step 0 the freshly cut sub-network's gradients cost the full net 1.8 pt at E=2)
        "depth-inplace-warm-2x": [{"method": "depth", "mac_ratio": 0.5, "importance": "loss",
                                   "inplace_epochs": a.epochs, "inplace_warmup": a.epochs / 2}],
        # online distillation: the blocks are dropped from the start model at once, then for all E epochs the
        # shallow student distils (T 5, alpha 0.9) from a dense teacher that itself trains on the labels alongside it
        # (the start model, same batches and schedule: the teacher *is* a dense control). The cut-then-KD student
        # ends near its teacher, which depth-kd-2x trains for only E/4 epochs; here it trains for all E. A step costs
        # a dense step plus a student step (~1.5x the control's)
        "depth-online-2x": [{"method": "depth", "mac_ratio": 0.5, "importance": "loss"},
                            {"method": "kd", "epochs": a.epochs, "teacher": "start", "online": True}],
        # depth-kd-2x with the teacher (the stage-0 model) training on alongside the student (online) during the KD
        # stage: the same start, cut and student budget, only the teacher keeps improving
        "depth-kd-online-2x": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                               {"method": "depth", "mac_ratio": 0.5, "importance": "loss"},
                               {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 4)),
                                "teacher": "stage:0", "online": True}],
        # depth-kd-2x with another data order (seed) in the KD stage only: the same start, teacher and cut, so the
        # difference to depth-kd-2x is the KD stage's run-to-run noise (what differences between arms must exceed)
        "depth-kd-2x-s1": [{"method": "finetune", "epochs": max(1, a.epochs // 4)},
                           {"method": "depth", "mac_ratio": 0.5, "importance": "loss"},
                           {"method": "kd", "epochs": max(1, a.epochs - max(1, a.epochs // 4)), "teacher": "stage:0",
                            "train": {"seed": 1}}],
        "grow-2x-r8": [{"method": "structured", "mac_ratio": 0.48, "importance": "l1", "round_to": 8,
                        "scope": "layer", "regularize_epochs": 1},
                       {"method": "finetune", "epochs": max(1, a.epochs - 1)}],
    }
    out = {"experiment": "resnet56", "epochs": a.epochs, "arms": {}}
    prev = OUT / (("resnet56" if a.epochs == 2 else f"resnet56-e{a.epochs}") + _prec(a) + ".json")
    if a.latency_only:        # re-measure finished arms (e.g. after engine changes) without touching training
        old = json.loads(prev.read_text())
        out["arms"] = {k: v for k, v in old["arms"].items() if k in a.arms.split(",")}
    # references, not pruning: the zoo's smaller dense ResNets fine-tuned for the same budget (what a user gets by
    # picking a smaller model instead of pruning; ResNet-32 has 0.55 of ResNet-56's MACs, ResNet-20 0.32)
    refs = {"ref-resnet32": ("resnet32", "akamaster_resnet32-d509ac18.th"),
            "ref-resnet20": ("resnet20", "akamaster_resnet20-12fca82f.th")}
    recorded = {}
    for name in ([] if a.latency_only else a.arms.split(",")):
        rec_file = exp / f"{name}.record.json"
        if a.from_records and not (exp / name / "model.safetensors").exists() and rec_file.exists():
            rec = json.loads(rec_file.read_text())
            if rec.get("finished"):
                recorded[name] = rec
                out["arms"][name] = {"start_acc": rec["start"]["acc"], "final_acc": rec["final_acc"],
                                     "stages": [s["result"]["eval"]["acc"] for s in rec["stages"]],
                                     "from_record": True}
                continue
        if (a.from_records and name == "control" and not (exp / name / "model.safetensors").exists()
                and not rec_file.exists() and prev.exists() and "control" in json.loads(prev.read_text())["arms"]):
            # a control trained before records existed: its accuracy from this budget's earlier JSON; latency on the
            # unpruned architecture (weight values do not change a dense network's latency)
            old = json.loads(prev.read_text())["arms"]["control"]
            recorded[name] = {"model_spec": None}
            out["arms"][name] = {"start_acc": old["start_acc"], "final_acc": old["final_acc"], "stages": old["stages"],
                                 "from_previous_json": prev.name}
            continue
        if name in refs:
            model, wf = refs[name]
            rc = recipe(model, str(SHARED / "models" / wf), a.data_dir, [{"method": "finetune", "epochs": a.epochs}],
                        {"threads": a.threads, **_prec_train(a)})
        else:
            rc = recipe("resnet56", w, a.data_dir, arms[name], {"threads": a.threads, **_prec_train(a)})
        res = run_arm(name, rc, exp)
        record_arm(exp / name)
        out["arms"][name] = {"start_acc": res["start"]["acc"], "final_acc": res["final"]["acc"],
                             "stages": [s["eval"]["acc"] for s in res["stages"]], "wall_s": res["wall_s"]}
    if a.train_only:
        return out
    x = torch.randn(1, 3, 32, 32)
    torch.set_num_threads(2)
    # an arm known only from its record (run directory on another machine) is rebuilt from its architecture with
    # fresh weights: its accuracy is the record's, and a dense network's latency does not depend on weight values
    models = {name: ((model_from_spec(recorded[name]["model_spec"]) if recorded[name]["model_spec"]
                      else sf.create_model("resnet56")).eval() if name in recorded
                     else load_final(exp / name)) for name in out["arms"]}
    for name, m in models.items():
        out["arms"][name].update(macs=count_macs(m, x), params=count_params(m))
    for b in (1, 32):
        out[f"latency_b{b}_t2"] = latency(models, b, a.runs)
    if prev.exists():     # arms measured earlier for this budget and not re-run now stay in the file, marked
        old = json.loads(prev.read_text())
        earlier = {**old.get("earlier_arms", {}), **{k: v for k, v in old["arms"].items() if k not in out["arms"]}}
        if earlier:
            out["earlier_arms"] = {k: v for k, v in earlier.items() if k not in out["arms"]}
    return out


def exp_ssl(a) -> dict:
    w = str(SHARED / "models" / "resnet20-cifar10jpeg.safetensors")
    exp = OUT / ("ssl" if a.epochs == 2 else f"ssl-e{a.epochs}")
    arms = {
        "control": [{"method": "finetune", "epochs": a.epochs}],
        "ssl": [{"method": "ssl", "epochs": max(1, a.epochs - 1), "lambda_g": a.lambda_g,
                 "groups": ["filter", "channel", "depth"], "threshold": a.threshold, "proximal": True},
                {"method": "finetune", "epochs": 1}],
    }
    out = {"experiment": "ssl", "epochs": a.epochs, "lambda_g": a.lambda_g, "threshold": a.threshold, "arms": {}}
    x = torch.randn(1, 3, 32, 32)
    for name in a.arms.split(","):
        # runs with another lambda / threshold than the first (0.05, 1e-3) get their own directory
        d = name if name != "ssl" or (a.lambda_g, a.threshold) == (0.05, 1e-3) else f"ssl-l{a.lambda_g:g}-t{a.threshold:g}"
        res = run_arm(d, recipe("resnet20", w, a.data_dir, arms[name], {} if a.device == "auto" else {"device": a.device}), exp)
        record_arm(exp / d)
        m = load_final(exp / d)
        out["arms"][name] = {"start_acc": res["start"]["acc"], "final_acc": res["final"]["acc"],
                             "stages": [s["eval"]["acc"] for s in res["stages"]], "macs": count_macs(m, x),
                             "params": count_params(m), "wall_s": res["wall_s"],
                             "group_norms": res["stages"][0].get("group_norms"),
                             "removed_branches": getattr(m, "sf_spec", {}).get("arch", {}).get("removed_branches")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", choices=["resnet56", "ssl"], default="resnet56")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--arms", default="")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--latency-only", action="store_true", help="resnet56: re-measure latency of finished arms")
    ap.add_argument("--threads", type=int, default=2, help="training threads (latency is always measured at 2)")
    ap.add_argument("--train-only", action="store_true",
                    help="resnet56: train the arms, skip latency and the JSON (e.g. two arms training side by side; "
                         "measure afterwards on a quiet machine with the same command without this flag)")
    ap.add_argument("--from-records", action="store_true",
                    help="resnet56: an arm whose run directory is missing but whose <arm>.record.json is finished is "
                         "not retrained: accuracy from the record, latency on its architecture rebuilt; a control "
                         "with neither takes its accuracy from this budget's earlier JSON")
    ap.add_argument("--record", action="store_true",
                    help="only write <arm>.record.json for every arm directory of the experiment (e.g. an arm still "
                         "training, before the machine is given back), then exit")
    ap.add_argument("--lambda-g", type=float, default=0.05, help="group-lasso weight (proximal steps)")
    ap.add_argument("--threshold", type=float, default=1e-3)
    ap.add_argument("--data-dir", default=str(SHARED / "data" / "cifar-10-batches-py"))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="training arithmetic (TrainConfig.precision); bf16 arms get their own directory and JSON")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the training forward (TrainConfig.compile; ResNet-56 bf16 channels_last: "
                         "~1.2x the images/s of eager, ~40 s to compile per stage)")
    ap.add_argument("--device", default="auto",
                    help="where training runs (TrainConfig.device: auto, cpu, cuda, cuda:N); latency is always "
                         "measured on the CPU")
    a = ap.parse_args()
    if a.experiment == "ssl" and a.precision != "fp32":
        ap.error("--precision applies to --experiment resnet56 only")
    a.arms = a.arms or ("control,l1-2x" if a.experiment == "resnet56" else "control,ssl")
    if a.record:
        base = "resnet56" if a.experiment == "resnet56" else "ssl"
        exp = OUT / ((base if a.epochs == 2 else f"{base}-e{a.epochs}") + (_prec(a) if base == "resnet56" else ""))
        for d in sorted(p for p in exp.iterdir() if p.is_dir()):
            rec = record_arm(d)
            if rec:
                print(f"{d.name}: {sum(s['done'] for s in rec['stages'])}/{len(rec['stages'])} stages done, "
                      f"{sum(len(s['metrics']) for s in rec['stages'])} epoch records, finished={rec['finished']}")
        return
    out = exp_resnet56(a) if a.experiment == "resnet56" else exp_ssl(a)
    if a.train_only:
        print(json.dumps(out, default=str)[:2000])
        return
    out["env"] = environment()
    OUT.mkdir(parents=True, exist_ok=True)
    tag = (a.experiment if a.epochs == 2 else f"{a.experiment}-e{a.epochs}") + _prec(a)
    if a.experiment == "ssl" and (a.lambda_g, a.threshold) != (0.05, 1e-3):
        tag += f"-l{a.lambda_g:g}-t{a.threshold:g}"
    (OUT / f"{tag}.json").write_text(json.dumps(out, indent=2, default=str))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if a.experiment == "resnet56":
        names = list(out["arms"])
        ax.bar(names, [out["arms"][n]["final_acc"] for n in names])
        ax.set_ylabel("test top-1 (%)")
        for n in names:
            print(f"{n}: acc {out['arms'][n]['final_acc']:.2f}%  MACs {out['arms'][n]['macs']:,}")
        for b in (1, 32):
            lat = out[f"latency_b{b}_t2"]
            print(f"batch {b}: " + "  ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in lat.items()))
    else:
        gn = out["arms"].get("ssl", {}).get("group_norms") or []
        for key in ("filter_mean", "channel_mean", "depth_mean"):
            ax.plot([r["epoch"] for r in gn], [r.get(key, float("nan")) for r in gn], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean group norm")
        ax.legend()
        for n, r in out["arms"].items():
            print(f"{n}: acc {r['final_acc']:.2f}%  MACs {r['macs']:,} params {r['params']:,}")
    fig.tight_layout()
    fig.savefig(OUT / f"{tag}.png", dpi=120)
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, default=str)[:2000])


if __name__ == "__main__":
    main()
