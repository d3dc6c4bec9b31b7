"""Is a pattern-sparse int8 conv worth building? The kernel design of issue 26, measured before the engine.

Compiles bench/int8_kernel_micro.c (gcc -O3 -march=native; needs AVX512-VNNI) and runs one pattern-sparse 3x3
layer per configuration (map size, channels, tile), fp32 engine-style kernel vs int8 VNNI kernel with per-tile
tap-quad packing, best of --reps, one thread; and, for scale, the real fp32 engine (sparseforge.compile, one
thread) on the same layer shape and sparsity (conv + ReLU, random weights, median and p10 of 60 calls): the
microbenchmark's fp32 kernel is the engine's structure without its constant tap offsets, filter groups or gather
mode, so the engine row is the baseline an int8 engine must beat. Writes JSON (and a bar plot) with the CPU.

  python bench/int8_kernel_micro.py --out bench/results/int8_kernel_micro
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from sparseforge.report.env import environment
from sparseforge.utils import atomic_write_json

HERE = Path(__file__).resolve().parent
CONFIGS = [(32, 64, 12), (32, 128, 12), (16, 256, 8), (16, 256, 4), (8, 512, 4), (8, 512, 5)]   # (H=W, C=F, tile vectors;
# 8x8 maps are 5 vectors: T=4 computes two overlapping tiles, T=5 the whole map once)


def engine_fp32(h: int, c: int) -> dict:
    import torch
    import torch.nn as nn

    import sparseforge as sf
    from sparseforge.report.latency import measure

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU()).eval()
    sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=3.6, prune_first_conv=True))
    x = torch.randn(1, c, h, h)
    e = sf.compile(m, x, threads=1)
    r = measure({"engine": lambda: e(x)}, runs=60)["engine"]
    return {"engine_fp32_ms": r["median_ms"], "engine_fp32_p10_ms": r["p10_ms"],
            "engine_kernels": int((m[0].weight != 0).sum()) // 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=str(HERE / "results" / "int8_kernel_micro"))
    a = ap.parse_args()
    if "avx512_vnni" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("this CPU has no AVX512-VNNI: the int8 kernel here is written for it")
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "micro"
        subprocess.run(["gcc", "-O3", "-march=native", "-o", str(exe), str(HERE / "int8_kernel_micro.c")], check=True)
        rows = []
        for h, c, t in CONFIGS:
            out = subprocess.run([str(exe), str(h), str(c), str(t), str(a.reps)], check=True, capture_output=True,
                                 text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    for r in rows:
        r.update(engine_fp32(r["H"], r["C"]))
        r["int8_vs_engine_fp32"] = r["engine_fp32_ms"] / r["int8_ms"]
        print({k: r[k] for k in ("H", "C", "T", "int8_ms", "engine_fp32_ms", "int8_vs_engine_fp32")}, flush=True)
    doc = {"benchmark": "int8_kernel_micro", "threads": 1, "reps": a.reps, "statistic": "best of reps", "rows": rows,
           "env": environment()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), doc)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['H']}x{r['H']}x{r['C']}\nT={r['T']}" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.27 for x in xs], [r["fp32_ms"] for r in rows], 0.27, label="fp32, engine structure")
        ax.bar(list(xs), [r["engine_fp32_ms"] for r in rows], 0.27, label="fp32 engine (sparseforge.compile)")
        ax.bar([x + 0.27 for x in xs], [r["int8_ms"] for r in rows], 0.27, label="int8 VNNI, tap quads")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("ms per layer, one thread")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
