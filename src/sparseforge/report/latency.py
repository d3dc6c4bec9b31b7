"""Latency measurement shared by the compile stage, the CLI and the benchmarks.

Arms alternate in blocks within one process. Each block starts once the previous arm's threads have gone
quiet, then discards two calls: torch's OpenMP pool, onnxruntime's pool and the engine's pool are separate
runtimes whose threads keep spinning after a call, and on a 2-core machine the previous arm's spinning threads
steal the cores from the arm being timed. Measured (session 39, Zen 4, 2 vCPUs): onnxruntime 1.32's worker
spins for ~40 ms after a ResNet-18 call at 224 (torch's ~10 ms, the engine's none), and an engine call started
inside that window took 9-13 ms instead of 5.3; a fixed 50 ms pause was borderline.
"""

from __future__ import annotations

import copy
import os
import statistics
import threading
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn


def _other_threads_cpu_ns() -> int | None:
    """CPU time so far of this process's threads other than the caller (None where /proc cannot say)."""
    me = threading.get_native_id()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total = 0
    for t in tids:
        if t == str(me):
            continue
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue                      # the thread ended meanwhile, or no schedstat in this kernel
    return total


def settle(min_s: float = 0.05, quiet_s: float = 0.02, max_s: float = 0.5) -> float:
    """Wait until no other thread of this process has run for ``quiet_s`` (a previous runtime's pool has stopped
    spinning), at least ``min_s`` and at most ``max_s``; returns the seconds waited. The kernel charges a
    spinning thread's time at least every scheduler tick (<= 4 ms here), so a quiet window of several ticks with
    no CPU time charged means no thread spins. Without /proc it is a plain ``min_s`` pause."""
    t0 = time.perf_counter()
    time.sleep(min_s)
    prev = _other_threads_cpu_ns()
    if prev is None:
        return time.perf_counter() - t0
    quiet_since = time.perf_counter()
    while True:
        time.sleep(quiet_s / 4)
        now = time.perf_counter()
        cur = _other_threads_cpu_ns()
        if cur != prev:
            prev, quiet_since = cur, now
        elif now - quiet_since >= quiet_s:
            return now - t0
        if now - t0 >= max_s:
            return now - t0


def measure(fns: dict[str, Callable[[], object]], runs: int = 30, block: int = 5, pause: float = 0.05,
            warmup: int = 3, keep_times: bool = False) -> dict[str, dict[str, float]]:
    """Median / p10 / p90 milliseconds per arm, >= ``runs`` timed calls each, arms rotated block by block (the
    one timing loop: CLI, recipe compile stage and bench scripts). Each block starts after ``settle(pause)``.
    ``keep_times`` adds every call's time (``times_ms``, in rounds of ``block``) for paired comparisons round by
    round."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode():
        for k in names:
            for _ in range(warmup):
                fns[k]()
        for r in range(-(-runs // block)):
            for k in names[r % len(names):] + names[: r % len(names)]:
                settle(pause)
                fns[k]()
                fns[k]()
                for _ in range(block):
                    t0 = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t0)
    out = {k: {"median_ms": 1e3 * statistics.median(v), "p10_ms": 1e3 * float(np.percentile(v, 10)),
               "p90_ms": 1e3 * float(np.percentile(v, 90)), "runs": len(v)} for k, v in times.items()}
    if keep_times:
        for k, v in times.items():
            out[k]["times_ms"] = [1e3 * t for t in v]
    return out


def torch_fused(model: nn.Module) -> nn.Module:
    """Eval copy with BatchNorm folded into the convs (the fair PyTorch dense baseline)."""
    import torch.fx.experimental.optimization as fx_opt

    m = copy.deepcopy(model).eval()
    try:
        return fx_opt.fuse(m)
    except Exception:  # noqa: BLE001 - untraceable models: time them unfused
        return m


def onnxruntime_session(model: nn.Module, example: torch.Tensor, threads: int):
    """An onnxruntime CPU session for the dense ONNX of ``model``, or None when onnxruntime is absent."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from ..export import export_onnx

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(export_onnx(model, example), so, providers=["CPUExecutionProvider"])


def onnxruntime_int8_session(model: nn.Module, example: torch.Tensor, threads: int, calibration: list | None = None):
    """What a latency-minded user runs today: onnxruntime static quantization of ``model`` (QDQ, per-channel int8
    weights, int8 activations, after onnxruntime's own pre-processing), or None when onnxruntime is absent.
    ``calibration``: input tensors shaped like ``example`` (default: 8 random ones, enough for a latency arm)."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError:
        return None
    import tempfile
    from pathlib import Path

    from ..export import export_onnx

    if calibration is None:
        g = torch.Generator().manual_seed(1)
        calibration = [torch.randn(example.shape, generator=g) for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"input": t.numpy()} for t in calibration])

        def get_next(self):
            return next(self.data, None)

    with tempfile.TemporaryDirectory(prefix="ort-int8-") as d:
        fp32, pre, int8 = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        export_onnx(model, example, fp32)
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp32), str(pre))
        except Exception:  # noqa: BLE001 - older onnxruntime: quantize the plain export
            pre = fp32
        quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        return ort.InferenceSession(int8.read_bytes(), so, providers=["CPUExecutionProvider"])
