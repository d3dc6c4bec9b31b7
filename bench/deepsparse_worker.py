"""Runs inside DeepSparse's own venv (it pins old numpy/onnx): time one ONNX model, print JSON.

Usage (called by bench/engine_speed.py --deepsparse-python VENV/bin/python):
  python bench/deepsparse_worker.py MODEL.onnx BATCH THREADS RUNS
"""

import json
import statistics
import sys
import time

import numpy as np


def main() -> None:
    path, batch, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    import deepsparse

    engine = deepsparse.compile_model(path, batch_size=batch, num_cores=threads)
    x = [np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)]
    for _ in range(10):
        engine(x)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine(x)
        ts.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": 1e3 * statistics.median(ts), "p10_ms": 1e3 * float(np.percentile(ts, 10)),
                      "p90_ms": 1e3 * float(np.percentile(ts, 90)), "version": deepsparse.__version__,
                      "output": engine(x)[0].ravel()[:10].tolist()}))


if __name__ == "__main__":
    main()
