"""The int8 engine against the integer reference on generated whole networks (issue 26, acceptance 1).

Every generated network (engine/testing.random_network: stems, residual/projection/bottleneck/inverted/SE/concat/
grouped/dilated blocks, pools, activations, sparsities, batch 1-8) is quantized (minmax calibration on two
perturbed copies of its input) and run through ``Int8Engine`` and ``QuantizedModel``; the outputs and every
natively computed op's integers must be equal. Networks whose quantization refuses (an int32 accumulator that
could overflow) are counted and skipped. Writes JSON, resumable every 100 networks.

  python bench/int8_engine_fuzz.py --networks 1000 --first-seed 0 [--isa avx2|portable] --out bench/results/int8_engine_fuzz.json
  python bench/int8_engine_fuzz.py --zoo resnet20,resnet56,vgg16,mobilenetv2 --out bench/results/int8_engine_zoo.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sparseforge as sf
from _fuzz import resume_point  # bench/ is on sys.path when this script runs
from sparseforge.engine.int8 import Int8Engine
from sparseforge.engine.quant import run_int
from sparseforge.engine.testing import random_network
from sparseforge.report.env import environment
from sparseforge.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", type=int, default=1000)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--portable", action="store_true", help="the plain C kernel (no -march=native): --isa portable")
    ap.add_argument("--isa", choices=["native", "avx2", "portable"], default=None,
                    help="the kernel path to build: native (this CPU), avx2 (what AVX2-only CPUs run), portable")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "int8_engine_fuzz.json"))
    ap.add_argument("--zoo", default="", help="instead: these bench/engine_speed.py models, dense and pattern 8x "
                    "(e.g. resnet20,resnet56,vgg16,mobilenetv2), engine == reference on 8 images each")
    a = ap.parse_args()
    a.isa = "portable" if a.portable else (a.isa or "native")
    if a.zoo:
        return zoo(a)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    st = {"networks": 0, "refused": 0, "native_convs": 0, "reference_ops": 0, "mismatches": []}
    st, start, spent = resume_point(out, a.first_seed, st, a.resume)
    t0 = time.perf_counter() - spent
    kernel = ""

    def write(complete: bool, next_seed: int) -> None:
        atomic_write_json(out, {"benchmark": "int8_engine_fuzz", "first_seed": a.first_seed, "requested": a.networks,
                                "complete": complete, "next_seed": next_seed, "isa": a.isa, "kernel": kernel,
                                "criterion": "bit-exact: outputs and every native op's integers equal the reference's",
                                **st, "seconds": round(time.perf_counter() - t0, 1), "env": environment()})

    for seed in range(start, a.first_seed + a.networks):
        model, x, desc = random_network(seed)
        g = torch.Generator().manual_seed(seed)
        try:
            qm = sf.quantize(model, sf.Int8Config(calibration="minmax"),
                             [x + 0.1 * torch.randn(x.shape, generator=g) for _ in range(2)])
        except sf.errors.SparseforgeError:
            st["refused"] += 1
            continue
        # 1-3 threads; half the networks split every single-tile conv's quads over the threads (by default only
        # the big ones are: split_quads_min), so the split path meets every op shape the generator makes
        e = Int8Engine(qm, threads=(1, 2, 2, 3)[seed % 4], isa=a.isa,
                       **({"split_quads_min": 1} if seed % 8 >= 4 else {}))
        kernel = e.kernel
        ref, got = run_int(qm.qgraph, x, keep=True), e.run(x, keep=True)
        ops = qm.qgraph.graph.ops
        bad = [ops[k].name for k in e.native if not torch.equal(ref[ops[k].output], got[ops[k].output])]
        if bad or not all(torch.equal(ref[o], got[o]) for o in qm.qgraph.graph.outputs):
            st["mismatches"].append({"seed": seed, "ops": bad, "network": desc})
            print(f"seed {seed}: mismatch in {bad or 'outputs'}: {' | '.join(desc)}", flush=True)
        st["networks"] += 1
        st["native_convs"] += len(e.plans)
        st["narrow_convs"] = st.get("narrow_convs", 0) + sum("-lane quads" in e.native[k].what for k in e.plans)
        st["split_convs"] = st.get("split_convs", 0) + sum("quads split" in e.native[k].what for k in e.plans)
        st["native_other_ops"] = st.get("native_other_ops", 0) + len(e.native) - len(e.plans)
        st["reference_ops"] += len(ops) - len(e.native)
        if st["networks"] % 100 == 0:
            print(f"{st['networks']} networks, {len(st['mismatches'])} mismatches, {time.perf_counter() - t0:.0f} s",
                  flush=True)
            write(False, seed + 1)
    write(True, a.first_seed + a.networks)
    print(json.dumps({k: v for k, v in st.items() if k != "mismatches"} | {"mismatches": len(st["mismatches"])}))


def zoo(a: argparse.Namespace) -> None:
    """The named networks, dense and pattern 8x, calibrated on 8 random images: the int8 engine's output and every
    native op's integers equal the reference's on 8 other images (batch 8, 2 threads) and one (batch 1)."""
    from engine_speed import CONFIGS, model_for  # bench/ is on sys.path when this script runs

    rows = []
    for name in a.zoo.split(","):
        for cfg in ("dense", "pattern8x"):
            m = model_for(name)
            if cfg != "dense":
                sf.prune(m, CONFIGS[cfg])
            g = torch.Generator().manual_seed(7)
            qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), [torch.randn(8, 3, 32, 32, generator=g)])
            e = sf.compile(qm, torch.randn(1, 3, 32, 32), threads=2, isa=a.isa)
            x = torch.randn(8, 3, 32, 32, generator=g)
            ref, got = run_int(qm.qgraph, x, keep=True), e.run(x, keep=True)
            ops = qm.qgraph.graph.ops
            bad = [ops[k].name for k in e.native if not torch.equal(ref[ops[k].output], got[ops[k].output])]
            ok = not bad and torch.equal(e(x), qm(x)) and torch.equal(e(x[:1]), qm(x[:1]))
            rows.append({"model": name, "sparsity": cfg, "isa": a.isa, "kernel": e.kernel, "equal": ok, "mismatched_ops": bad,
                         "native_ops": len(e.native), "ops": len(ops)})
            print(rows[-1], flush=True)
    atomic_write_json(Path(a.out), {"benchmark": "int8_engine_zoo", "criterion": "bit-exact: outputs (batch 8 and 1) "
                                    "and every native op's integers equal the reference's", "results": rows,
                                    "env": environment()})


if __name__ == "__main__":
    main()
