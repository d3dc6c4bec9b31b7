"""Stage 6: run -- load the built library with ctypes and execute the plan on torch tensors.

``CompiledModel`` takes and returns NCHW float32 tensors. Native segments run
as one C call each (one OpenMP region per segment, a barrier between layers);
PyTorch fallbacks run in between on views of the same buffers.
"""

from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import SparseforgeError
from .artefact import save_engine
from .interpret import run_torch_op
from .ir import TorchOp

FRONT = 64   # floats of zeros before every buffer (64-byte aligned data, reads just before a plane in bounds)


class CompiledModel:
    """A compiled network. Call it like the model: ``engine(x)`` with x of shape (N, C, H, W), float32."""

    def __init__(self, spec: dict, lib_path: Path, floats: np.ndarray, ints: np.ndarray,
                 torch_ops: dict[int, TorchOp] | None = None, source: str = "", artefact_dir: Path | None = None):
        self.spec = spec
        # one call at a time: a call's activations live in buffers shared by every call of its batch size (found by
        # the concurrent-callers test: two threads' inputs overwrote each other, relative error 0.33)
        self._lock = threading.Lock()
        self.lib_path = Path(lib_path)
        self.source = source
        self._torch_ops = torch_ops or {}
        # torch's allocator aligns to 64 bytes (numpy's may not): blob arrays added with align=16 then start
        # on cache lines
        f = np.ascontiguousarray(floats, dtype=np.float32)
        self._floats = torch.empty(f.size, dtype=torch.float32).copy_(torch.from_numpy(f))
        self._ints = torch.from_numpy(np.ascontiguousarray(ints, dtype=np.int32))
        self._lib = ctypes.CDLL(str(self.lib_path))
        self._wp, self._ip = self._floats.data_ptr(), self._ints.data_ptr()
        self._segs = {}
        self._tsegs = {}
        for si, seg in enumerate(spec["segments"]):
            if seg["kind"] == "native":
                fn = getattr(self._lib, f"seg{si}")
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
                fn.restype = None
                self._segs[si] = fn
                tfn = getattr(self._lib, f"tseg{si}", None)    # absent in artefacts built before tracing
                if tfn is not None:
                    tfn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                    tfn.restype = None
                    self._tsegs[si] = tfn
        self._ops = {}
        for k, op in enumerate(spec["ops"]):
            if op["native"]:
                fn = getattr(self._lib, f"run_op{k}")
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
                fn.restype = None
                self._ops[k] = fn
        self._buffers: dict[int, tuple] = {}
        self._fast: dict[int, tuple | None] = {}       # by batch size (see __call__)
        self._profile: dict[int, float] | None = None
        self._run_threads = spec["threads"]
        self.input_shape = tuple(spec["input_shape"])
        missing = [op["name"] for k, op in enumerate(spec["ops"]) if not op["native"] and k not in self._torch_ops]
        if missing:
            raise SparseforgeError(f"engine artefact lacks the PyTorch fallback ops {missing}; recompile the model")

    @property
    def run_threads(self) -> int:
        """Threads each call runs on: the compiled count unless lowered (e.g. one thread per engine when several
        processes share the cores). Every op splits filters, rows or images over whatever threads it gets and
        reduces in a fixed order, so the result is the same bits."""
        return self._run_threads

    @run_threads.setter
    def run_threads(self, n: int) -> None:
        t = self.spec["threads"]
        if not isinstance(n, int) or not 1 <= n <= t:
            raise SparseforgeError(f"run_threads must be an int from 1 to the {t} threads the engine was compiled "
                                   f"for, got {n!r}; compile with threads={n} for more")
        self._run_threads = n

    # ---- buffers ------------------------------------------------------------
    def _alloc(self, n: int):
        if n in self._buffers:
            return self._buffers[n]
        vals = self.spec["values"]
        bufs: dict[int, torch.Tensor] = {}
        views: dict[int, torch.Tensor] = {}
        slack = self.spec["slack"]

        def zeros(floats: int) -> torch.Tensor:
            # FRONT floats before the buffer too: a 2-D flat tile's corner tap reads one position before a plane
            # (a lane that is masked off), which for the first plane is before the buffer
            return torch.zeros(FRONT + floats, dtype=torch.float32)[FRONT:]

        # values share slot buffers where the memory plan says so (artefacts without one: a buffer per value)
        slot_bufs = [zeros(n * f + slack) for f in self.spec.get("slots", [])]
        for vid_s, v in vals.items():
            vid = int(vid_s)
            if not v["buffer"]:
                continue
            slot = v.get("slot", -1)
            t = slot_bufs[slot] if slot >= 0 else zeros(n * v["image"] + slack)
            shape = v["shape"]
            if "offset" in v:       # an input of a concatenation written in place: planes inside the concatenation's
                c, h, w = shape
                bufs[vid] = t[v["offset"]:]
                views[vid] = t.as_strided((n, c, h, w), (v["image"], v["plane"], v["rs"], 1),
                                          t.storage_offset() + v["offset"] + v["rs"] + 1)
                continue
            bufs[vid] = t
            if v["is_map"]:
                c, h, w = shape
                views[vid] = t[: n * v["image"]].view(n, c, h + 2, v["rs"])[:, :, 1:h + 1, 1:w + 1]
            else:
                views[vid] = t[: n * v["image"]].view(n, *shape)
        # indexed by value id (JSON may have reordered the keys)
        nv = max(int(k) for k in vals) + 1
        # packing area of gather-mode convs, addressed as buffer id ``scratch_id``: a fixed size
        # ("scratch_total"), or per image in artefacts built before that ("scratch")
        scratch = self.spec.get("scratch_total", n * self.spec.get("scratch", 0))
        if scratch:
            sid = self.spec["scratch_id"]
            bufs[sid] = zeros(scratch + slack)
            nv = max(nv, sid + 1)
        ptrs = (ctypes.c_void_p * nv)(*[bufs[i].data_ptr() if i in bufs else None for i in range(nv)])
        self._buffers[n] = (bufs, views, ptrs)
        return self._buffers[n]

    # ---- run -------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise SparseforgeError(f"engine input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise SparseforgeError(f"engine input must be float32, got {x.dtype}; call x.float()")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise SparseforgeError(f"engine input must have shape (N, {', '.join(map(str, self.input_shape))}), "
                                   f"got {tuple(x.shape)}; the engine was compiled for that per-image shape")
        if x.shape[0] < 1:
            raise SparseforgeError("engine input has an empty batch")
        if x.device.type != "cpu":
            raise SparseforgeError(f"engine input must be on the CPU, got a tensor on {x.device}; call x.cpu()")

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the common call -- a CPU float32 tensor of the compiled shape, every op generated -- goes straight to the
        # C segments: Python that runs right after a large network finds its caches cold, so each step of the
        # general path below cost microseconds (ResNet-20 at 32x32: the call took 20 us more than its segments)
        if (type(x) is torch.Tensor and x.dtype is torch.float32 and x.shape[1:] == self.input_shape and x.is_cpu
                and x.shape[0] > 0):
            n = x.shape[0]
            fast = self._fast[n] if n in self._fast else self._fast_path(n)
            if fast:
                inp, fns, args, out = fast
                with self._lock:
                    np.copyto(inp, x.detach().numpy())
                    for fn in fns:
                        fn(*args, self._run_threads)
                    return torch.from_numpy(out.copy())
        return self._run(x)

    def _fast_path(self, n: int) -> tuple | None:
        """For batch n, decided once: the input buffer's interior, the native segments, their arguments and the
        output as numpy views; or None (fallback ops, several inputs or outputs, an input without a buffer)."""
        spec, fast = self.spec, None
        if (len(spec["inputs"]) == 1 and len(spec["outputs"]) == 1
                and all(seg["kind"] == "native" for seg in spec["segments"])):
            bufs, views, ptrs = self._alloc(n)
            i, o = spec["inputs"][0], spec["outputs"][0]
            if i in bufs and o in views:
                fns = [self._segs[si] for si in range(len(spec["segments"]))]
                fast = (views[i].numpy(), fns, (ptrs, n, self._wp, self._ip), views[o].numpy())
        self._fast[n] = fast
        return fast

    def traced(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """A forward pass through the traced segment functions: the output and the per-op, per-thread timestamps
        the network profile is made of (the output equals a plain call's)."""
        trace: dict = {}
        return self._run(x, trace=trace), trace

    @torch.inference_mode()
    def _run(self, x: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        self._check(x)
        with self._lock:
            return self._run_locked(x, trace)

    def _run_locked(self, x: torch.Tensor, trace: dict | None) -> torch.Tensor:
        n = x.shape[0]
        bufs, views, ptrs = self._alloc(n)
        env: dict[int, torch.Tensor] = dict(views)
        inp = self.spec["inputs"][0]
        if inp in bufs:
            # numpy's copy runs on this thread: a torch copy of a large input wakes torch's OpenMP threads, which
            # then spin for milliseconds on the cores the engine's threads are about to need (MobileNetV2 8x at
            # 224 on the engine's own pool: 2.2 ms with this copy, 9 ms with torch's)
            np.copyto(views[inp].numpy(), x.detach().numpy())
        env[inp] = views.get(inp, x)
        packed = set(self.spec["packed"])
        nt = self._run_threads if trace is None else self.spec["threads"]
        for si, seg in enumerate(self.spec["segments"]):
            if seg["kind"] == "native":
                if trace is not None:
                    buf = trace.setdefault(si, np.zeros((2 * len(seg["ops"]) + 1) * self.spec["threads"] + 8))
                    t0 = time.perf_counter()
                    self._tsegs[si](ptrs, n, self._wp, self._ip, buf.ctypes.data)
                    trace[("wall", si)] = time.perf_counter() - t0
                else:
                    self._segs[si](ptrs, n, self._wp, self._ip, nt)
            else:
                for k in seg["ops"]:
                    t0 = time.perf_counter()
                    op = self._torch_ops[k]
                    y = run_torch_op(op, env)
                    if op.output in packed:
                        views[op.output].copy_(y)
                        env[op.output] = views[op.output]
                    else:
                        env[op.output] = y
                    if trace is not None:
                        trace[("torch", k)] = time.perf_counter() - t0
        outs = [torch.from_numpy(np.array(env[o].numpy(), order="C")) for o in self.spec["outputs"]]   # (as above)
        return outs[0] if len(outs) == 1 else tuple(outs)

    # ---- introspection ------------------------------------------------------------
    def profile(self, batch: int = 1, reps: int = 20, mode: str = "isolated") -> dict[int, float]:
        """Median seconds per op. ``isolated``: native ops one at a time, each in its own parallel region, its
        data hot in cache. ``network``: whole forward passes, each op from the end of the previous op's barrier
        to the end of its own, so cold weights, cache misses between layers and waiting for the slower thread
        are charged to the op that suffers them (details per thread in ``self.profile_detail``)."""
        if mode == "network":
            return self._profile_network(batch, reps)
        if mode != "isolated":
            raise SparseforgeError(f"profile mode must be 'isolated' or 'network', got {mode!r}")
        x = torch.randn(batch, *self.input_shape)
        self(x)
        bufs, views, ptrs = self._alloc(batch)
        times: dict[int, float] = {}
        for k, op in enumerate(self.spec["ops"]):
            if op["native"] and "fused_into" in op:
                times[k] = 0.0          # runs inside its fused block op, timed there
            elif op["native"]:
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    self._ops[k](ptrs, batch, self._wp, self._ip)
                    ts.append(time.perf_counter() - t0)
                times[k] = float(np.median(ts))
        # fallbacks: time the whole forward minus native ops is noisy; time each op directly
        env = dict(views)
        for k, op in enumerate(self.spec["ops"]):
            if not op["native"]:
                top = self._torch_ops[k]
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    y = run_torch_op(top, env)
                    ts.append(time.perf_counter() - t0)
                env[top.output] = y
                times[k] = float(np.median(ts))
        self._profile = times
        return times

    def _profile_network(self, batch: int, reps: int) -> dict[int, float]:
        native = [si for si, seg in enumerate(self.spec["segments"]) if seg["kind"] == "native"]
        if any(si not in self._tsegs for si in native):
            raise SparseforgeError("this engine artefact was built without traced segments; recompile the model "
                                   "to profile in network order")
        x = torch.randn(batch, *self.input_shape)
        for _ in range(3):
            self(x)
        nth = self.spec["threads"]
        walls: dict[int, list[float]] = {}
        work: dict[int, list[list[float]]] = {}
        for _ in range(reps):
            tr: dict = {}
            self._run(x, trace=tr)
            for si, seg in enumerate(self.spec["segments"]):
                if seg["kind"] != "native":
                    for k in seg["ops"]:
                        walls.setdefault(k, []).append(tr[("torch", k)])
                    continue
                m = len(seg["ops"])
                t = tr[si]
                if not t.any():
                    raise SparseforgeError("network profile: the library was built without OpenMP, so its "
                                           "segments record no times; use mode='isolated'")
                start = t[2 * m * nth: 2 * m * nth + nth]
                stamps = t[: 2 * m * nth].reshape(m, nth, 2)
                prev = start
                for j, k in enumerate(seg["ops"]):
                    # the op began for everyone when the last thread left the previous barrier
                    began = prev.max()
                    walls.setdefault(k, []).append(float(stamps[j, :, 1].max() - began))
                    work.setdefault(k, []).append([float(v) for v in stamps[j, :, 0] - prev])
                    prev = stamps[j, :, 1]
        times = {k: float(np.median(v)) for k, v in walls.items()}
        self.profile_detail = {k: {"wall_s": times[k],
                                   "work_s_per_thread": [float(np.median([r[i] for r in work[k]]))
                                                         for i in range(nth)] if k in work else None}
                               for k in times}
        self._profile = times
        return times

    def summary(self, profile: bool = True) -> str:
        """Every op, the path it runs on (generated kernel or PyTorch fallback) and its share of time."""
        traced = all(si in self._tsegs for si in self._segs)      # artefacts built before tracing: isolated
        mode = "network" if traced else "isolated"
        times = self.profile(mode=mode) if profile and self._profile is None else (self._profile or {})
        total = sum(times.values()) or 1.0
        rows = [f"{'#':>3}  {'op':28s} {'path':9s} {'time':>9s} {'share':>6s}  details"]
        for k, op in enumerate(self.spec["ops"]):
            t = times.get(k)
            ts = f"{1e6 * t:7.1f}us" if t is not None else "        -"
            share = f"{100 * t / total:5.1f}%" if t is not None else "     -"
            path = "generated" if op["native"] else "PyTorch"
            rows.append(f"{k:>3}  {op['name'][:28]:28s} {path:9s} {ts:>9s} {share:>6s}  {op['describe']}")
        nat = sum(1 for o in self.spec["ops"] if o["native"])
        rows.append(f"{nat}/{len(self.spec['ops'])} ops generated; {len(self.spec['ops']) - nat} PyTorch fallbacks; "
                    f"{self.spec['threads']} threads"
                    + (f" (calls run on {self._run_threads}: run_threads; the profile uses all)"
                       if self._run_threads != self.spec["threads"] else "")
                    + "; batch-1 profile"
                    + (" in network order (cache misses and waits included)" if traced else " (ops in isolation)"))
        return "\n".join(rows)

    def save(self, path: str | Path) -> Path:
        return save_engine(self, Path(path))
