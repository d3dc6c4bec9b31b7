"""``sparseforge.compile``: trace -> fold -> plan -> codegen -> build -> run, each stage inspectable."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import SparseforgeError
from ..utils import atomic_write_bytes
from .artefact import read_artefact
from .build import build, cache_root, resolve_isa
from .codegen import generate
from .ir import ConvOp, Graph, TorchOp, graph_fingerprint
from .plan import SLACK, Plan, PlanOptions, lower, make_plan
from .runtime import CompiledModel
from .trace import build_ir, trace


@dataclasses.dataclass
class Stages:
    """Every intermediate, for inspection (``compile(..., return_stages=True)``)."""

    graph_module: Any = None
    graph: Graph | None = None
    plan: Plan | None = None
    source: str = ""
    build_info: dict | None = None
    seconds: dict = dataclasses.field(default_factory=dict)


def assign_slots(plan: Plan, buffered: set[int]) -> tuple[dict[int, int], list[int]]:
    """Memory plan: values whose lifetimes do not overlap share a buffer ("slot"), so a network's activations
    cycle through a few buffers that stay in cache instead of streaming through fresh memory every layer.

    Only maps with the same plane geometry (H, W, row stride) share a slot: kernels write interiors only, so a
    plane's zero border stays valid for every value the slot ever holds. A slot is sized (floats per image) for
    its largest value. Graph inputs and outputs keep slots of their own.
    """
    g = plan.graph
    # a concatenation's in-place inputs are slices of its buffer: placed, kept and freed as the concatenation
    base = {v: z for v, (z, _) in plan.aliases.items()}
    last: dict[int, int] = {}

    def read(v: int, k: int) -> None:
        v = base.get(v, v)
        last[v] = max(last.get(v, k), k)

    for k, op in enumerate(g.ops):
        for v in list(op.inputs) + ([op.residual] if isinstance(op, ConvOp) and op.residual is not None else []):
            read(v, k)
    # a fused block reads its input and writes its output inside one op, image after image: its input stays
    # live until the block's last op, so the output never takes the input's slot
    for bp in plan.blocks.values():
        for v in list(g.ops[bp.a].inputs):
            read(v, bp.c)
    for bd in plan.bands.values():
        for v in list(g.ops[bd.a].inputs):
            read(v, bd.b)
    # an op fused into a later one (a squeeze-excite multiply into its conv) has its inputs read by that op
    also: dict[int, set[int]] = {}
    for a, k in plan.absorbed.items():
        if k > a:
            also.setdefault(k, set()).update(g.ops[a].inputs)
            for v in g.ops[a].inputs:
                read(v, k)
    pinned = set(g.inputs) | set(g.outputs)
    slot_of: dict[int, int] = {}
    sizes: list[int] = []
    geom: list[tuple] = []
    free: list[int] = []

    def place(vid: int) -> None:
        lay = plan.layouts[vid]
        key = (lay.shape[1:], lay.rs, lay.plane) if lay.is_map else None
        j = next((j for j in free if key is not None and geom[j] == key and vid not in pinned), None)
        if j is None:
            sizes.append(0)
            geom.append(key)
            j = len(sizes) - 1
        else:
            free.remove(j)
        slot_of[vid] = j
        sizes[j] = max(sizes[j], lay.image)

    for vid in g.inputs:
        if vid in buffered:
            place(vid)
    for k, op in enumerate(g.ops):
        out = base.get(op.output, op.output)
        if op.output in buffered and out not in slot_of:
            place(out)
        # values read for the last time by this op: their slots are free for the ops after it
        for v in {base.get(v, v) for v in (set(op.inputs) | also.get(k, set())
                                           | ({op.residual} if isinstance(op, ConvOp) and op.residual is not None
                                              else set()))}:
            if last.get(v) == k and v in slot_of and v not in pinned:
                free.append(slot_of[v])
    for v, z in base.items():
        if z in slot_of:
            slot_of[v] = slot_of[z]
    return slot_of, sizes


def runtime_spec(plan: Plan, input_shape: tuple[int, ...]) -> dict:
    g = plan.graph
    consumed_native = set()
    for op in g.ops:
        if op.native:
            consumed_native.update(op.inputs)
            if isinstance(op, ConvOp) and op.residual is not None:
                consumed_native.add(op.residual)
    produced_native = {op.output for op in g.ops if op.native}
    packed = sorted(v for v in consumed_native if v not in produced_native)
    buffered = consumed_native | produced_native
    slot_of, slots = assign_slots(plan, buffered)
    values = {}
    for vid, v in g.values.items():
        lay = plan.layouts[vid]
        values[str(vid)] = {"shape": list(v.shape), "is_map": lay.is_map, "rs": lay.rs, "plane": lay.plane,
                            "image": lay.image, "buffer": vid in buffered, "slot": slot_of.get(vid, -1)}
        if vid in plan.aliases and vid in buffered:     # in place in a concatenation: floats from its start
            values[str(vid)]["offset"] = plan.aliases[vid][1] * lay.plane
    ops = []
    for k, op in enumerate(g.ops):
        d = {"name": op.name, "kind": op.kind, "native": op.native, "describe": op.describe(),
             "inputs": op.inputs, "output": op.output}
        if k in plan.convs:
            c = plan.convs[k]
            d.update(kernels=c.kernels, taps=c.taps, flops_per_image=c.flops, shapes=len(c.shapes),
                     block=[c.rows, c.vecs], mode=c.mode, channel_blocks=c.flat_ncb)
            if c.flat_rt:       # 2-D flat tiles (AVX2 builds): rows x vectors, input packed or read in place
                d.update(row_tiles=[c.flat_rt, c.flat_tv], packed=c.flat_pack)
            if c.chan_planes > 1:   # a phase split's conv running the original kernels over each channel's phases
                d["phase_planes"] = c.chan_planes
            if c.in_scale >= 0:
                d["describe"] = f"{d['describe']} [input x gate: squeeze-excite multiply fused in]"

        if k in plan.blocks:
            bp = plan.blocks[k]
            d["fused_block"] = [bp.a, bp.b, bp.c]
            d["flops_per_image"] = bp.flops
            d["describe"] = f"{d['describe']} [fused block: ops {bp.a}-{bp.c}]"
        if k in plan.bands:
            bd = plan.bands[k]
            d["fused_band"] = [bd.a, bd.b]
            d["flops_per_image"] = bd.flops
            d["describe"] = f"{d['describe']} [fused bands of {bd.rows} rows: ops {bd.a}-{bd.b}]"
        if k in plan.absorbed:
            d["fused_into"] = plan.absorbed[k]
            d["describe"] = (f"{d['describe']} [in place: its inputs are written into it]" if op.kind == "concat"
                             else f"{d['describe']} [runs in fused op {plan.absorbed[k]}]")
        ops.append(d)
    return {"format": "sparseforge-engine-1", "input_shape": list(input_shape), "inputs": g.inputs,
            "outputs": g.outputs, "values": values, "ops": ops, "packed": packed, "threads": plan.threads,
            "segments": [{"kind": k, "ops": idx} for k, idx in plan.segments], "slack": SLACK,
            "scratch_total": plan.scratch, "scratch_id": plan.scratch_id,
            "slots": slots, "claim_parts": bool(plan.options.claim_parts)}


_CODE_HASH: str | None = None


def _engine_code_hash() -> str:
    """The compiler's own source: a plan cached by an older compiler is never reused by a newer one."""
    global _CODE_HASH
    if _CODE_HASH is None:
        h = hashlib.sha256()
        for f in sorted(Path(__file__).parent.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH


def plan_key(graph: Graph, options: dict) -> str:
    h = hashlib.sha256()
    # the planner's knobs are in ``options`` (PlanOptions, when not the defaults) and its defaults in the code
    for part in (graph_fingerprint(graph), json.dumps(options, sort_keys=True), _engine_code_hash()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _plan_dir(key: str) -> Path:
    return cache_root().parent / "plans" / key[:40]


def load_plan(key: str) -> tuple[dict, str, np.ndarray, np.ndarray] | None:
    """A plan cached under ``key`` (spec, C source, weight and index blobs), or None. A damaged entry (torn
    write, edited file) is a miss: the entry records its own hashes and is rebuilt when they disagree."""
    d = _plan_dir(key)
    try:
        meta = json.loads((d / "plan.json").read_text())
        blobs = (d / "blobs.bin").read_bytes()
        if meta.get("key") != key or hashlib.sha256(blobs).hexdigest() != meta["blobs_sha256"] \
                or hashlib.sha256(meta["source"].encode()).hexdigest() != meta["source_sha256"]:
            return None
        nf = int(meta["floats"])
        floats = np.frombuffer(blobs, dtype=np.float32, count=nf).copy()
        ints = np.frombuffer(blobs, dtype=np.int32, offset=4 * nf).copy()
        return meta["spec"], meta["source"], floats, ints
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_plan(key: str, spec: dict, source: str, floats: np.ndarray, ints: np.ndarray) -> None:
    d = _plan_dir(key)
    try:
        d.mkdir(parents=True, exist_ok=True)
        blobs = np.ascontiguousarray(floats, np.float32).tobytes() + np.ascontiguousarray(ints, np.int32).tobytes()
        meta = {"key": key, "spec": spec, "source": source, "floats": int(np.asarray(floats).size),
                "blobs_sha256": hashlib.sha256(blobs).hexdigest(),
                "source_sha256": hashlib.sha256(source.encode()).hexdigest()}
        atomic_write_bytes(d / "blobs.bin", blobs)
        atomic_write_bytes(d / "plan.json", json.dumps(meta).encode())
    except OSError:        # a read-only or full cache only costs the next compile its planning time
        pass


def _has_avx512() -> bool:
    from ..hardware import cpu_flags

    return "avx512f" in cpu_flags()


def default_vector_width(portable: bool) -> int:
    """8 floats (AVX2; SSE pairs when portable). 16 (AVX-512) is available via ``vector_width=16`` but measured
    slower on CIFAR VGG-16 here (narrow maps waste half-empty 16-lane vectors), so it is not the default."""
    return 8


def _compile_int8(qm, example_input, threads, isa, return_stages, vector_width, conv_mode, plan_options):
    from .int8 import Int8Engine

    if return_stages or vector_width is not None or conv_mode != "auto" or plan_options is not None:
        raise SparseforgeError("return_stages, vector_width, conv_mode and plan_options are fp32-engine options: "
                               "compile a QuantizedModel with threads and isa only")
    if not isinstance(example_input, torch.Tensor) or tuple(example_input.shape[1:]) != tuple(qm.input_shape):
        raise SparseforgeError(f"this QuantizedModel was quantized for inputs of shape (N, "
                               f"{', '.join(map(str, qm.input_shape))}): pass an example_input of that shape")
    return Int8Engine(qm, threads=int(threads or torch.get_num_threads()), isa=isa)


def compile(model: nn.Module, example_input: torch.Tensor, threads: int | None = None, portable: bool = False,
            return_stages: bool = False, vector_width: int | None = None, conv_mode: str = "auto",
            plan_options: PlanOptions | None = None, isa: str | None = None):
    """Compile ``model`` (eval mode: BN folded with its running stats) for inputs shaped like ``example_input``.

    ``threads`` defaults to torch's thread count; ``vector_width`` (8 or 16 floats) to what the CPU supports.
    ``conv_mode``: "auto" (measured heuristic: blocked mode for convs with >= 75% non-zero weights; for sparse
    ones gather mode for 3x3 convs with >= 128 input channels on maps of <= 64 pixels, packed for 1x1 convs
    on such maps, flat or direct otherwise), "direct", "gather" or "blocked" (every eligible conv; for tests
    and tuning). ``plan_options``: the planner's tuning knobs (``PlanOptions``; measured defaults), recorded in
    the engine's spec and its artefact. Layers without a native kernel run in PyTorch and are listed by
    ``engine.summary()``. A ``QuantizedModel`` (``sf.quantize``) compiles to the int8 engine (``Int8Engine``:
    bit-exact with the model's integer reference). ``isa``: "native" (default: this CPU's instructions), "avx2"
    (the code an AVX2-only CPU runs, on any AVX2 host) or "portable" (any x86-64; ``portable=True`` is the same).
    """
    isa = resolve_isa(isa, portable)
    if type(model).__name__ == "QuantizedModel":
        return _compile_int8(model, example_input, threads, isa, return_stages, vector_width, conv_mode,
                             plan_options)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise SparseforgeError("example_input must be a 4-D NCHW float tensor, e.g. torch.randn(1, 3, 32, 32)")
    threads = int(threads or torch.get_num_threads())
    if plan_options is not None and not isinstance(plan_options, PlanOptions):
        raise SparseforgeError("plan_options must be a sparseforge.engine.PlanOptions, e.g. PlanOptions(max_group=1)")
    st = Stages()
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        st.graph_module = trace(model, example_input.float())
        st.seconds["trace"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        po = plan_options or PlanOptions()
        st.graph = build_ir(st.graph_module, po.embed_max_kernels, po.embed_grouped, po.channel_gathers,
                            po.native_resize)
        st.seconds["fold"] = time.perf_counter() - t0
        _check_finite(st.graph)
    finally:
        model.train(was_training)
    t0 = time.perf_counter()
    portable = isa == "portable"
    vec = vector_width or default_vector_width(portable)
    if vec not in (8, 16):
        raise SparseforgeError(f"vector_width must be 8 or 16, got {vec}")
    if vec == 16 and isa == "avx2":
        raise SparseforgeError("vector_width=16 is AVX-512's; isa='avx2' builds 8-float vectors (omit vector_width)")
    if conv_mode not in ("auto", "direct", "gather", "blocked"):
        raise SparseforgeError(f"conv_mode must be 'auto', 'direct', 'gather' or 'blocked', got {conv_mode!r}")
    wide = isa == "native" and vec == 8 and _has_avx512()
    options = {"input_shape": list(example_input.shape[1:]), "threads": threads, "vec": vec, "conv_mode": conv_mode,
               "wide": wide, "portable": portable}
    if isa == "avx2":
        options["isa"] = isa            # native and portable engines keep the keys and artefacts they had
    if plan_options is not None and plan_options != PlanOptions():
        options["plan"] = dataclasses.asdict(plan_options)     # defaults stay out: cache keys and artefacts unchanged
    st.graph = lower(st.graph, plan_options or PlanOptions(), vec, wide)
    st.seconds["fingerprint"] = time.perf_counter() - t0
    engine = engine_from_graph(st.graph, options, st, use_cache=not return_stages)
    return (engine, st) if return_stages else engine


def _check_finite(graph: Graph) -> None:
    """NaN/Inf weights (after folding BatchNorm) would give NaN outputs for every input: refuse, naming the layer."""
    for op in graph.ops:
        for f in ("weight", "bias", "scale", "shift"):
            t = getattr(op, f, None)
            if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
                raise SparseforgeError(f"layer {op.name!r} has NaN or Inf in its {f} (BatchNorm statistics folded "
                                       "in); the model diverged or was damaged: load good weights before compiling")


def engine_from_graph(graph: Graph, options: dict, st: Stages | None = None, use_cache: bool = True,
                      artefact_dir: Path | None = None) -> CompiledModel:
    """Plan, generate, build and load: the stages after folding, shared by ``compile`` and ``load_engine`` (which
    rebuilds an artefact from its stored graph instead of trusting a stored binary)."""
    st = st if st is not None else Stages()
    st.graph = graph
    key = plan_key(graph, options)
    cached = load_plan(key) if use_cache else None
    if cached is not None:
        spec, st.source, floats, ints = cached
    else:
        t0 = time.perf_counter()
        st.plan = make_plan(graph, options["threads"], options["vec"], options["conv_mode"], wide=options["wide"],
                            opts=PlanOptions(**options.get("plan", {})))
        st.seconds["plan"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        st.source = generate(st.plan)
        st.seconds["codegen"] = time.perf_counter() - t0
        spec = runtime_spec(st.plan, tuple(options["input_shape"]))
        floats, ints = st.plan.blob.floats(), st.plan.blob.ints()
    t0 = time.perf_counter()
    lib, st.build_info = build(st.source, portable=options["portable"], isa=options.get("isa"))
    st.seconds["build"] = time.perf_counter() - t0
    if cached is None:
        store_plan(key, spec, st.source, floats, ints)
    spec = dict(spec)
    spec["options"] = dict(options)
    spec["build"] = {**st.build_info, "plan_cached": cached is not None}
    torch_ops = {k: op for k, op in enumerate(graph.ops) if isinstance(op, TorchOp)}
    engine = CompiledModel(spec, lib, floats, ints, torch_ops, st.source, artefact_dir=artefact_dir)
    engine.stages = st
    return engine


def load_engine(path: str | Path) -> CompiledModel:
    """An engine from an artefact directory: its graph is re-planned and its C source regenerated and rebuilt by
    *this* sparseforge (never a binary from the directory); refused if the source differs from the stored one."""
    path, graph, options, source = read_artefact(path)
    engine = engine_from_graph(graph, options, artefact_dir=path)
    if engine.source != source:
        raise SparseforgeError(f"{path}: the C source regenerated from the stored graph differs from the stored "
                               "kernel.c (made by another sparseforge engine version, or edited); recompile the model")
    return engine
