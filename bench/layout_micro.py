"""Would a blocked channel layout make the engine's dense layers as fast as onnxruntime's in network order?

Compiles bench/layout_micro.c (gcc -O3 -march=native, AVX-512) and runs a chain of dense 1x1 convs shaped like
ResNet-50's layer1 (256->64, 64->256, three times) at 56x56 and 28x28 on one thread, in the engine's padded planar
layout (its flat-gemm micro-kernel) and in nChw16c (16 channels of a pixel contiguous: onnxruntime's and oneDNN's
layout). Per layout: the sum of the layers timed in isolation (each repeated, warm) and the chain timed in order
(best of 10), so the network-order penalty is the ratio of the two. Writes JSON with the CPU.

  python bench/layout_micro.py --out bench/results/layout_micro.json
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

from sparseforge.report.env import environment
from sparseforge.utils import atomic_write_json

HERE = Path(__file__).resolve().parent
LINE = re.compile(r"(\w+)\s+(\d+)x\d+: isolated sum (\d+) us, chain (\d+) us \(([\d.]+)x\), chain ([\d.]+) GMAC/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="56,28")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the binary per size (median reported per run)")
    ap.add_argument("--out", default=str(HERE / "results" / "layout_micro.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "layout_micro"
        subprocess.run(["gcc", "-O3", "-march=native", "-o", str(exe), str(HERE / "layout_micro.c")], check=True)
        rows = []
        for size in map(int, a.sizes.split(",")):
            for r in range(a.repeats):
                out = subprocess.run([str(exe), str(size)], check=True, capture_output=True, text=True).stdout
                for m in LINE.finditer(out):
                    rows.append({"layout": m[1], "size": int(m[2]), "run": r, "isolated_sum_us": int(m[3]),
                                 "chain_us": int(m[4]), "chain_over_isolated": float(m[5]), "chain_gmacs": float(m[6])})
                    print(m[0])
    atomic_write_json(Path(a.out), {"benchmark": "layout_micro", "threads": 1, "rows": rows, "env": environment()})


if __name__ == "__main__":
    main()
