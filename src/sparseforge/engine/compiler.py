"""``sparseforge.compile``: trace -> fold -> plan -> codegen -> build -> run, each stage inspectable."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.nn as nn

from ..errors import SparseforgeError
from .build import build
from .codegen import generate
from .ir import ConvOp, Graph, TorchOp
from .plan import SLACK, Plan, make_plan
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
    last: dict[int, int] = {}
    for k, op in enumerate(g.ops):
        for v in list(op.inputs) + ([op.residual] if isinstance(op, ConvOp) and op.residual is not None else []):
            last[v] = k
    # a fused block reads its input and writes its output inside one op, image after image: its input stays
    # live until the block's last op, so the output never takes the input's slot
    for bp in plan.blocks.values():
        for v in list(g.ops[bp.a].inputs):
            last[v] = max(last.get(v, bp.c), bp.c)
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
        if op.output in buffered and op.output not in slot_of:
            place(op.output)
        # values read for the last time by this op: their slots are free for the ops after it
        for v in set(op.inputs) | ({op.residual} if isinstance(op, ConvOp) and op.residual is not None else set()):
            if last.get(v) == k and v in slot_of and v not in pinned:
                free.append(slot_of[v])
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
    ops = []
    for k, op in enumerate(g.ops):
        d = {"name": op.name, "kind": op.kind, "native": op.native, "describe": op.describe(),
             "inputs": op.inputs, "output": op.output}
        if k in plan.convs:
            c = plan.convs[k]
            d.update(kernels=c.kernels, taps=c.taps, flops_per_image=c.flops, shapes=len(c.shapes),
                     block=[c.rows, c.vecs])
        if k in plan.blocks:
            bp = plan.blocks[k]
            d["fused_block"] = [bp.a, bp.b, bp.c]
            d["flops_per_image"] = bp.flops
            d["describe"] = f"{d['describe']} [fused block: ops {bp.a}-{bp.c}]"
        if k in plan.absorbed:
            d["fused_into"] = plan.absorbed[k]
            d["describe"] = f"{d['describe']} [runs in fused op {plan.absorbed[k]}]"
        ops.append(d)
    return {"format": "sparseforge-engine-1", "input_shape": list(input_shape), "inputs": g.inputs,
            "outputs": g.outputs, "values": values, "ops": ops, "packed": packed, "threads": plan.threads,
            "segments": [{"kind": k, "ops": idx} for k, idx in plan.segments], "slack": SLACK,
            "scratch_total": plan.scratch, "scratch_id": plan.scratch_id,
            "slots": slots}


def _has_avx512() -> bool:
    from ..report.env import cpu_flags

    return "avx512f" in cpu_flags()


def default_vector_width(portable: bool) -> int:
    """8 floats (AVX2; SSE pairs when portable). 16 (AVX-512) is available via ``vector_width=16`` but measured
    slower on CIFAR VGG-16 here (narrow maps waste half-empty 16-lane vectors), so it is not the default."""
    return 8


def compile(model: nn.Module, example_input: torch.Tensor, threads: int | None = None, portable: bool = False,
            return_stages: bool = False, vector_width: int | None = None, conv_mode: str = "auto"):
    """Compile ``model`` (eval mode: BN folded with its running stats) for inputs shaped like ``example_input``.

    ``threads`` defaults to torch's thread count; ``vector_width`` (8 or 16 floats) to what the CPU supports.
    ``conv_mode``: "auto" (measured heuristic: gather mode for 3x3 convs with >= 128 input channels on maps of
    <= 64 pixels, direct otherwise), "direct" or "gather" (every eligible conv; for tests and tuning). Layers
    without a native kernel run in PyTorch and are listed by ``engine.summary()``.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise SparseforgeError("example_input must be a 4-D NCHW float tensor, e.g. torch.randn(1, 3, 32, 32)")
    threads = int(threads or torch.get_num_threads())
    st = Stages()
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        st.graph_module = trace(model, example_input.float())
        st.seconds["trace"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        st.graph = build_ir(st.graph_module)
        st.seconds["fold"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    t0 = time.perf_counter()
    vec = vector_width or default_vector_width(portable)
    if vec not in (8, 16):
        raise SparseforgeError(f"vector_width must be 8 or 16, got {vec}")
    if conv_mode not in ("auto", "direct", "gather"):
        raise SparseforgeError(f"conv_mode must be 'auto', 'direct' or 'gather', got {conv_mode!r}")
    st.plan = make_plan(st.graph, threads, vec, conv_mode, wide=not portable and vec == 8 and _has_avx512())
    st.seconds["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    st.source = generate(st.plan)
    st.seconds["codegen"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lib, st.build_info = build(st.source, portable=portable)
    st.seconds["build"] = time.perf_counter() - t0
    spec = runtime_spec(st.plan, tuple(example_input.shape[1:]))
    spec["build"] = st.build_info
    torch_ops = {k: op for k, op in enumerate(st.graph.ops) if isinstance(op, TorchOp)}
    engine = CompiledModel(spec, lib, st.plan.blob.floats(), st.plan.blob.ints(), torch_ops, st.source)
    engine.stages = st
    return (engine, st) if return_stages else engine
