"""int8 post-training accuracy (issue 26, acceptance 2): fp32 vs the integer reference on the full test set.

    python bench/int8_accuracy.py --out bench/results/int8_accuracy.json \
        --models resnet20=../shared/models/resnet20-cifar10jpeg.safetensors \
                 resnet56=../shared/models/akamaster_resnet56-4bfd9763.th \
                 resnet20-pattern8x=bench/results/frontier/pattern-8x-gradual.safetensors [--engine]

Calibration: the first ``--calibration`` training images (class-interleaved), batches of 64, each method of
``Int8Config.calibration`` (and ``auto``, which picks one by calibration-set accuracy). Accuracy of each int8
model is measured by its integer reference (``QuantizedModel.forward``) on all 10,000 test images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparseforge import load_weights
from sparseforge.data import BatchLoader, load_dataset, resolve_normalization
from sparseforge.engine.quant import Int8Config, quantize
from sparseforge.models import model_from_spec, read_state_dict, create_model
from sparseforge.report.env import environment
from sparseforge.train import evaluate
from sparseforge.utils import atomic_write_json


def load(arch: str, path: str) -> torch.nn.Module:
    if path.endswith(".safetensors"):
        meta = read_state_dict(path)[1].get("model", "")
        if meta.startswith("{"):          # a pruned model's spec (its layer sizes); else a plain model name
            model = model_from_spec(json.loads(meta))
            load_weights(model, path)
            return model.eval()
    model = create_model(arch.split("-")[0], num_classes=10)
    load_weights(model, path)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="name=weights (name starts with the architecture)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--methods", default="minmax,percentile,mse,auto")
    ap.add_argument("--limit", type=int, default=0, help="test images (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", action="store_true",
                    help="also run each int8 model through the int8 engine (Int8Engine) on the same images")
    ap.add_argument("--out", default="bench/results/int8_accuracy.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train, test = load_dataset("cifar10", a.data_dir)
    if a.limit:
        test = test.subset(a.limit)
    norm = resolve_normalization("cifar10", "auto")
    calib = [(x, y) for x, y in BatchLoader(train.subset(a.calibration), 64, normalize=norm).iterate(0)]
    rows = []
    for spec in a.models:
        name, path = spec.split("=", 1)
        model = load(name, path)
        t0 = time.perf_counter()
        fp32 = evaluate(model, BatchLoader(test, 500, normalize=norm))["acc"]
        row = {"model": name, "weights": path, "fp32_acc": fp32, "fp32_eval_s": round(time.perf_counter() - t0, 1),
               "int8": {}}
        print(f"{name}: fp32 {fp32:.2f}%", flush=True)
        for m in a.methods.split(","):
            t0 = time.perf_counter()
            qm = quantize(model, Int8Config(calibration=m), calib)
            tq = time.perf_counter() - t0
            t0 = time.perf_counter()
            acc = evaluate(qm, BatchLoader(test, 500, normalize=norm))["acc"]
            row["int8"][m] = {"acc": acc, "delta_pt": acc - fp32, "chosen": qm.qgraph.method,
                              "scores": qm.qgraph.scores, "quantize_s": round(tq, 1),
                              "eval_s": round(time.perf_counter() - t0, 1), "fallbacks": qm.fallbacks}
            print(f"  int8 {m} ({qm.qgraph.method}): {acc:.2f}% ({acc - fp32:+.2f} pt)", flush=True)
            if a.engine:          # the engine is bit-exact with the reference: the same accuracy, at its speed
                from sparseforge.engine.int8 import Int8Engine

                e, t0, right, seen = Int8Engine(qm, threads=a.threads), time.perf_counter(), 0, 0
                for x, y in BatchLoader(test, 500, normalize=norm):
                    right += int((e(x).argmax(1) == y).sum())
                    seen += len(y)
                row["int8"][m].update(engine_acc=100.0 * right / seen, engine_kernel=e.kernel,
                                      engine_eval_s=round(time.perf_counter() - t0, 1))
                print(f"    int8 engine ({e.kernel}): {100.0 * right / seen:.2f}%", flush=True)
        rows.append(row)
        atomic_write_json(Path(a.out), {"benchmark": "int8_accuracy", "calibration_images": a.calibration,
                                        "test_images": len(test), "results": rows, "env": environment()})


if __name__ == "__main__":
    main()
