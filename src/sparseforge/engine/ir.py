"""The engine's intermediate representation: values and ops after tracing and folding.

Every value has a per-image shape ((C, H, W) or (F,)); the batch is a runtime
argument. Ops are either *native* (run by generated C) or ``TorchOp``
fallbacks; the runtime moves values between the padded C layout and torch
tensors only where a fallback sits between native ops.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class Value:
    id: int
    shape: tuple[int, ...]          # per image: (C, H, W) or (F,)
    name: str = ""

    @property
    def is_map(self) -> bool:
        return len(self.shape) == 3


@dataclasses.dataclass
class Op:
    name: str                        # the module path / node name it came from (for summary())
    inputs: list[int]
    output: int

    kind = "op"
    native = True

    def describe(self) -> str:
        return self.kind


@dataclasses.dataclass(frozen=True)
class Embed:
    """A dilated or non-square kernel placed in the op's square one (``trace.embed_conv``), so every kernel mode
    runs it as a K x K conv whose other taps are structural zeros. PyTorch never reads the pixels under those
    taps, so no mode may multiply them (a NaN or Inf there would spread): ``taps`` is what a mode may run."""

    kh: int                           # the original kernel, dilation and padding
    kw: int
    dh: int
    dw: int
    ph: int
    pw: int
    top: int                          # its first tap's place in the K x K kernel
    left: int

    def taps(self, k: int) -> tuple[int, ...]:
        return tuple(sorted((self.top + i * self.dh) * k + self.left + j * self.dw
                            for i in range(self.kh) for j in range(self.kw)))

    def original(self, w: torch.Tensor) -> torch.Tensor:
        return w[:, :, self.top:self.top + self.dh * (self.kh - 1) + 1:self.dh,
                 self.left:self.left + self.dw * (self.kw - 1) + 1:self.dw]

    def describe(self) -> str:
        d = f" d{self.dh}" if self.dh == self.dw else f" d{self.dh}x{self.dw}"
        return f"{self.kh}x{self.kw}{d if max(self.dh, self.dw) > 1 else ''} p{self.ph},{self.pw}"


@dataclasses.dataclass
class ConvOp(Op):
    weight: torch.Tensor = None       # (O, I/groups, kh, kw), BN and masks folded in
    bias: torch.Tensor = None         # (O,)
    stride: int = 1
    padding: int = 0
    groups: int = 1
    act: str = "none"                 # none | relu | relu6
    residual: int | None = None      # value id added before the activation
    res_kind: str = "identity"        # identity | pad_shortcut
    res_stride: int = 1
    res_pad_before: int = 0
    folded: list[str] = dataclasses.field(default_factory=list)
    # > 1 after phase lowering: input channels c, c + tap_period, ... are one phase and share the taps that
    # exist (the rest are zeros PyTorch never multiplies: a kernel may not run them, or a NaN would spread)
    tap_period: int = 1
    embed: Embed | None = None        # a dilated or non-square kernel in this square one

    kind = "conv"

    def taps(self) -> tuple[int, ...]:
        """The taps a kernel mode may run: all of the kernel's, or an embedded kernel's own."""
        k = self.weight.shape[2]
        return self.embed.taps(k) if self.embed is not None else tuple(range(k * self.weight.shape[3]))

    def describe(self) -> str:
        o, i, kh, kw = self.weight.shape
        nz = int((self.weight != 0).sum())
        parts = [f"conv{kh}x{kw} {i * self.groups}->{o} s{self.stride} p{self.padding}"]
        if self.embed is not None:
            parts.append(f"(embeds {self.embed.describe()})")
        if self.groups > 1:
            parts.append(f"g{self.groups}")
        parts.append(f"density {nz / self.weight.numel():.3f}")
        fused = list(self.folded) + ([f"+res({self.res_kind})"] if self.residual is not None else [])
        fused += [self.act] if self.act != "none" else []
        if fused:
            parts.append("fused: " + ",".join(fused))
        return " ".join(parts)


@dataclasses.dataclass
class PhaseOp(Op):
    """Space-to-depth with zero padding: output channel (c * s + py) * s + px holds input pixels
    (s * i + py - padding, s * j + px - padding) of channel c, 0 outside the map. A k x k stride-s conv with any
    padding equals a ceil(k / s)-sized stride-1 unpadded conv over it: the compiler's lowering of 7x7 stride-2
    stems and of padding wider than the layout's one-pixel border (see plan.lower)."""
    stride: int = 2
    padding: int = 0
    kind = "phase"

    def describe(self) -> str:
        return f"phase split s{self.stride} p{self.padding}" if self.stride > 1 else f"zero pad {self.padding}"


@dataclasses.dataclass
class PoolOp(Op):
    mode: str = "max"                 # max | avg
    kernel: int = 2
    stride: int = 2
    padding: int = 0                  # max: padded positions never win; avg: see include_pad
    include_pad: bool = True          # avg: divide by kernel*kernel (PyTorch's count_include_pad) or by the valid count
    ceil_mode: bool = False           # max: the output size rounded up, its last windows clipped at the map's end
    kind = "pool"

    def describe(self) -> str:
        if self.kernel == 1 and self.padding == 0:
            return f"subsample s{self.stride}"
        return (f"{self.mode}pool{self.kernel} s{self.stride}" + (f" p{self.padding}" if self.padding else "")
                + (" ceil" if self.ceil_mode else ""))


@dataclasses.dataclass
class FlattenOp(Op):
    """A map's interior as one plain vector per image (C*H*W, row-major as torch.flatten), for a linear layer."""

    kind = "flatten"


@dataclasses.dataclass
class GapOp(Op):
    kind = "global_avg_pool"


@dataclasses.dataclass
class LinearOp(Op):
    weight: torch.Tensor = None
    bias: torch.Tensor = None
    act: str = "none"
    kind = "linear"

    def describe(self) -> str:
        dens = float((self.weight != 0).float().mean()) if self.weight is not None else 1.0
        return (f"linear {self.weight.shape[1]}->{self.weight.shape[0]}" + (f" density {dens:.3f}" if dens < 1 else "")
                + (f" +{self.act}" if self.act != "none" else ""))


@dataclasses.dataclass
class TorchOp(Op):
    """A PyTorch fallback: the fx node's target applied to (args with value ids substituted)."""

    target: Any = None                # callable (function or module)
    call: str = "function"            # function | module | method
    args: Any = None                  # nested structure; value refs as ("__value__", id)
    kwargs: Any = None
    reason: str = ""
    native = False
    kind = "torch"

    def describe(self) -> str:
        if hasattr(self.target, "describe"):       # a FallbackConv: what it runs and what was folded into it
            return f"torch {self.target.describe()} ({self.reason})"
        t = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", type(self.target).__name__)
        return f"torch {t} ({self.reason})" if self.reason else f"torch {t}"


@dataclasses.dataclass
class Graph:
    values: dict[int, Value]
    ops: list[Op]
    inputs: list[int]
    outputs: list[int]

    @staticmethod
    def reads(op: Op) -> list[int]:
        """The values ``op`` reads: its inputs and a residual fused into its epilogue."""
        r = getattr(op, "residual", None)
        return list(op.inputs) + ([r] if r is not None and r not in op.inputs else [])

    def users(self, vid: int) -> list[Op]:
        return [op for op in self.ops if vid in self.reads(op)]


def graph_fingerprint(graph: Graph) -> str:
    """A content hash of everything planning reads: values and their shapes, ops with every field, weights by
    their bytes. Two graphs with the same fingerprint get the same plan, so a plan can be cached under it."""
    import hashlib

    h = hashlib.sha256()

    def put(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().contiguous().cpu()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        elif isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            for y in x:
                put(y)
            h.update(b"]")
        elif isinstance(x, dict):
            h.update(f"{{{len(x)}".encode())
            for k in sorted(x, key=str):
                put(str(k))
                put(x[k])
            h.update(b"}")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    for vid in sorted(graph.values):
        put((vid, tuple(graph.values[vid].shape)))
    put(("in", list(graph.inputs), "out", list(graph.outputs)))
    for op in graph.ops:
        put(type(op).__name__)
        for f in dataclasses.fields(op):
            v = getattr(op, f.name)
            if f.name == "target":          # a fallback's module/function: its type and name (it runs live)
                v = f"{type(v).__name__}:{getattr(v, '__name__', '')}"
            put((f.name, v))
    return h.hexdigest()


@dataclasses.dataclass
class EltwiseOp(Op):
    """Element-wise over one or two values of the same channel count, interior only (a map's zero border stays
    zero): ``fn`` an activation of input 0; "affine" (a BatchNorm not after a conv: x * scale[c] + shift[c]);
    "mul" / "add" of two values, the second broadcast over H and W when it is (C, 1, 1) (squeeze-excite);
    activations with constants in ``params``: "leaky_relu" (slope,), "clamp" (lo, hi) (Hardtanh, torch.clamp;
    +-inf for a missing bound)."""

    fn: str = "silu"
    scale: torch.Tensor = None
    shift: torch.Tensor = None
    params: tuple = ()
    kind = "eltwise"

    def describe(self) -> str:
        return f"{self.fn}({', '.join(f'{v:g}' for v in self.params)})" if self.params else self.fn


@dataclasses.dataclass
class ConcatOp(Op):
    """Channel concatenation: each input copied into its channel range of the output."""

    kind = "concat"

    def describe(self) -> str:
        return f"concat of {len(self.inputs)}"


@dataclasses.dataclass
class GatherOp(Op):
    """Output channel j is input channel ``index[j]``, every plane unchanged: what ``chunk``, ``split``,
    ``narrow``, a channel slice and ShuffleNet's channel shuffle (view, transpose, view) compute, proved so for
    the model's own code by ``trace.channel_gathers``."""

    index: tuple = ()
    kind = "gather"

    def __post_init__(self) -> None:
        self.index = tuple(int(i) for i in self.index)      # (a stored graph gives a list)

    def describe(self) -> str:
        ix, n = list(self.index), len(self.index)
        if n and ix == list(range(ix[0], ix[0] + n)):
            return f"channels {ix[0]}-{ix[-1]}"
        if sorted(ix) == list(range(n)):
            return f"channel permutation of {n}"
        return "channels [" + ", ".join(map(str, ix[:8])) + (", ...]" if n > 8 else "]")


@dataclasses.dataclass
class ResizeOp(Op):
    """``F.interpolate`` / ``nn.Upsample``, nearest or bilinear: output row y reads input rows ``ys`` (one per row,
    or two, weighted by ``yw``), columns likewise. The tables are PyTorch's own (``trace.resize_tables``); ``scales``
    and ``align_corners`` are kept for the reference interpreter, which calls PyTorch."""

    mode: str = "nearest"
    align_corners: bool = False
    scales: tuple | None = None        # the scale factors PyTorch was given (None: from the sizes)
    ys: tuple = ()
    yw: tuple = ()
    xs: tuple = ()
    xw: tuple = ()
    kind = "resize"

    def __post_init__(self) -> None:       # (a stored graph gives lists)
        self.ys, self.xs = tuple(int(v) for v in self.ys), tuple(int(v) for v in self.xs)
        self.yw, self.xw = tuple(float(v) for v in self.yw), tuple(float(v) for v in self.xw)
        self.scales = tuple(float(v) for v in self.scales) if self.scales is not None else None

    def describe(self) -> str:
        ac = " align_corners" if self.align_corners else ""
        sc = f" x{self.scales[0]:g},{self.scales[1]:g}" if self.scales else ""
        return f"resize {self.mode}{ac}{sc}"


# ---- graphs as data (engine artefacts store their graph, never a binary) ------------------------------------
NATIVE_OPS = {cls.__name__: cls for cls in (ConvOp, PhaseOp, PoolOp, FlattenOp, GapOp, LinearOp, EltwiseOp, ConcatOp,
                                            GatherOp, ResizeOp)}


def graph_to_data(graph: Graph) -> tuple[dict, dict[str, torch.Tensor]]:
    """The graph as JSON-able data plus named tensors. Only native ops: an engine with PyTorch fallbacks holds
    live modules and is not saved."""
    tensors: dict[str, torch.Tensor] = {}
    ops = []
    for k, op in enumerate(graph.ops):
        name = type(op).__name__
        if name not in NATIVE_OPS:
            raise ValueError(f"op {op.name!r} ({name}) cannot be stored as data")
        fields = {}
        for f in dataclasses.fields(op):
            v = getattr(op, f.name)
            if isinstance(v, torch.Tensor):
                key = f"op{k}.{f.name}"
                tensors[key] = v.detach().float().contiguous()
                fields[f.name] = {"tensor": key}
            else:
                fields[f.name] = list(v) if isinstance(v, tuple) else v
        ops.append({"type": name, "fields": fields})
    data = {"values": [{"id": v.id, "shape": list(v.shape), "name": v.name} for v in graph.values.values()],
            "ops": ops, "inputs": list(graph.inputs), "outputs": list(graph.outputs)}
    return data, tensors


def graph_from_data(data: dict, tensors: dict[str, torch.Tensor]) -> Graph:
    """Inverse of ``graph_to_data``; raises ValueError/KeyError/TypeError on anything malformed."""
    values = {int(v["id"]): Value(int(v["id"]), tuple(int(s) for s in v["shape"]), str(v["name"]))
              for v in data["values"]}
    ops: list[Op] = []
    for o in data["ops"]:
        cls = NATIVE_OPS[o["type"]]
        kw = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for name, v in o["fields"].items():
            if name not in names:
                raise KeyError(f"unknown field {name!r} of {o['type']}")
            kw[name] = tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
        ops.append(cls(**kw))
    return Graph(values, ops, [int(i) for i in data["inputs"]], [int(i) for i in data["outputs"]])
