"""Latency when the cores are shared, and on the first call after an idle pause: the engine (default schedule:
ops as claimed parts on the library's own thread pool; OpenMP regions with a barrier after every op, what shipped
before session 27; the default plan with ``run_threads = 1``) vs onnxruntime fp32, quiet and beside 1..k busy
processes (each a Python loop, as another job on the machine).

Why: with a barrier after every op, a thread the OS deschedules holds the other thread at the next barrier, once per
op (MobileNetV2 at 224 has ~60), and libgomp's waiters spin ~300k iterations before sleeping, so the thread left
running spins through its slice. Claimed parts let whichever thread is running take the parts nobody has started,
the caller never waits for a worker that has not started, and waits sleep after 1 ms. After an idle pause the
workers are asleep and a virtual CPU may take a millisecond to wake: the claimed schedule runs on without them.

Run with nothing else running (each setting alternates the arms in one process):
  python bench/contention.py --models mobilenet_v2:pattern8x:224,resnet50:pattern8x:224,resnet56:pattern8x:32 \
      --hogs 0,1,2 --threads 2 --runs 10 --sessions 3
Timing: "warm" (default) times a call after a pause (report.latency.settle: >= 50 ms and until the previous arm's
threads are quiet) and 2 discarded calls; --after-idle times the first call after the pause. Writes
bench/results/contention[-after-idle].json and .png (median latency per arm).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sparseforge as sf
from sparseforge.engine.plan import PlanOptions
from sparseforge.report.env import environment
from sparseforge.report.latency import onnxruntime_session, settle
from sparseforge.report.plots import plt  # Agg backend
from sparseforge.utils import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import CONFIGS, model_for  # noqa: E402  (bench/ is on sys.path when this script runs)

ROOT = Path(__file__).resolve().parents[1]


def arms_for(name: str, cfg: str, size: int, threads: int) -> dict:
    dense = model_for(name)
    pruned = copy.deepcopy(dense)
    if cfg != "dense":
        sf.prune(pruned, CONFIGS[cfg])
    x = torch.randn(1, 3, size, size)
    arms = {}
    for label, opts in (("engine", PlanOptions()),
                        ("engine-openmp-barriers", PlanOptions(thread_pool=False, claim_parts=False))):
        e = sf.compile(pruned, x, threads=threads, plan_options=opts)
        arms[label] = (lambda e_: lambda: e_(x))(e)
    one = sf.compile(pruned, x, threads=threads)
    one.run_threads = 1          # the same plan on one thread (what a user sharing the cores may pick)
    arms["engine-run_threads=1"] = lambda: one(x)
    sess = onnxruntime_session(dense, x, threads)
    if sess is not None:
        xn = x.numpy()
        arms["onnxruntime-fp32-dense"] = lambda: sess.run(None, {"input": xn})
    return arms


def timed_rounds(arms: dict, runs: int, after_idle: bool = False) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(runs):
        for k in names[r % len(names):] + names[: r % len(names)]:
            settle()            # >= 50 ms, and the previous arm's pool has stopped spinning
            if not after_idle:
                arms[k]()
                arms[k]()
            t0 = time.perf_counter()
            arms[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2:pattern8x:224,resnet50:pattern8x:224,resnet56:pattern8x:32")
    ap.add_argument("--hogs", default="0,1,2", help="busy processes beside the timed one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10, help="timed calls per arm per session")
    ap.add_argument("--sessions", type=int, default=3, help="times each setting is measured with fresh processes")
    ap.add_argument("--after-idle", action="store_true", help="time the first call after each 50 ms pause")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    a.out = a.out or str(ROOT / "bench" / "results" / ("contention-after-idle" if a.after_idle else "contention"))
    torch.set_num_threads(a.threads)
    results = []
    for spec in a.models.split(","):
        name, cfg, size = spec.split(":")
        arms = arms_for(name, cfg, int(size), a.threads)
        with torch.inference_mode():
            for f in arms.values():
                for _ in range(3):
                    f()
            # the OS places the busy processes differently each time they start: every setting is measured in
            # several sessions (fresh processes each), interleaved with the other settings
            times_by_n: dict[int, dict[str, list[float]]] = {}
            for _ in range(a.sessions):
                for n in map(int, a.hogs.split(",")):
                    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
                    try:
                        time.sleep(1.0 if n else 0.0)
                        t = timed_rounds(arms, a.runs, a.after_idle)
                    finally:
                        for h in hogs:
                            h.kill()
                            h.wait()
                    acc = times_by_n.setdefault(n, {k: [] for k in arms})
                    for k, v in t.items():
                        acc[k] += v
            for n, times in times_by_n.items():
                stats = {k: {"median_ms": 1e3 * statistics.median(v), "p10_ms": 1e3 * float(np.percentile(v, 10)),
                            "p90_ms": 1e3 * float(np.percentile(v, 90))} for k, v in times.items()}
                row = {"model": name, "sparsity": cfg, "size": int(size), "threads": a.threads, "busy_processes": n,
                       "runs": a.runs * a.sessions, "sessions": a.sessions, "arms": stats}
                results.append(row)
                print(f"{name} {cfg} {size} busy={n}: " + "  ".join(
                    f"{k} {v['median_ms']:.2f} (p90 {v['p90_ms']:.2f})" for k, v in row["arms"].items()), flush=True)
    out = Path(a.out[:-5] if a.out.endswith(".json") else a.out)      # a path stem: <out>.json and <out>.png
    atomic_write_json(Path(str(out) + ".json"), {
        "benchmark": "contention", "results": results, "env": environment(),
        "timing": "first call after a 50 ms pause" if a.after_idle else "after a 50 ms pause and 2 discarded calls",
        "method": "arms alternate (rotated order); each timed call after a 50 ms pause (and 2 discarded calls unless "
                  "--after-idle); "
                  "busy processes are `python -c 'while True: pass'`, started 1 s before timing; each setting measured "
                  "in --sessions sessions with fresh busy processes, interleaved; median/p10/p90 over all of them"})
    models = sorted({(r["model"], r["sparsity"], r["size"]) for r in results}, key=str)
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2), squeeze=False)
    for ax, (name, cfg, size) in zip(axes[0], models):
        rows = [r for r in results if (r["model"], r["sparsity"], r["size"]) == (name, cfg, size)]
        for arm in rows[0]["arms"]:
            ax.plot([r["busy_processes"] for r in rows], [r["arms"][arm]["median_ms"] for r in rows], "o-", label=arm)
        ax.set_yscale("log")
        ax.set_title(f"{name} {cfg} {size}px", fontsize=8)
        ax.set_xlabel("busy processes beside it")
        ax.set_ylabel("median latency (ms)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(str(out) + ".png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
