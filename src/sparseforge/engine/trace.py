"""Stage 1+2: trace with torch.fx, then fold BN and masks and fuse epilogues into the IR.

Folding happens while walking the graph in order: a BatchNorm right after a
conv (its only user) is folded into the conv's weights and bias; a ReLU/ReLU6
after it becomes the conv's activation; an add of a conv output (only user)
and another value becomes the conv's residual epilogue -- including the
option-A zero-pad shortcut, which is read in place, never materialised. Any
node we cannot map stays a PyTorch op (correct, and listed by summary()).
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SparseforgeError
from ..models.cifar_resnet import PadShortcut
from .ir import (ConcatOp, ConvOp, EltwiseOp, Embed, FlattenOp, GapOp, GatherOp, Graph, LinearOp, Op, PoolOp, ResizeOp,
                 TorchOp, Value)

_LEAVES = (PadShortcut,)


NATIVE_K = (1, 3, 5, 7)     # square kernel sizes the generated convs run


def embed_conv(kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
               weight: torch.Tensor) -> tuple[torch.Tensor, int, Embed] | None:
    """A dilated or non-square conv (DeepLab's atrous 3x3s, Inception's 1x7/7x1) as a square K x K conv with
    padding P whose other taps are zeros (the Embed None for a plain square conv, whose weight is returned as it
    is), or None when no such K in ``NATIVE_K`` exists. Output (y, x) of the
    original reads input (y*s - ph + i*dh, x*s - pw + j*dw); placed at (top + i*dh, left + j*dw) in the square
    kernel it reads (y*s - P + top + i*dh, ...), the same pixel for top = P - ph, left = P - pw. The outputs are
    the same size for every input size only if K - 2P = eh - 2ph = ew - 2pw (eh, ew: the dilated extents). The
    structural zeros are recorded (``Embed``) so no kernel mode runs them: PyTorch never reads those pixels."""
    (kh, kw), (dh, dw), (ph, pw) = kernel, dilation, padding
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if eh - 2 * ph != ew - 2 * pw or min(ph, pw) < 0:
        return None
    P = max(ph, pw)
    K = eh - 2 * ph + 2 * P
    if K not in NATIVE_K or P > K // 2 or P - ph + eh > K or P - pw + ew > K:
        return None
    if (kh, kw, dh, dw) == (K, K, 1, 1):
        return weight, P, None          # a plain square conv: nothing to embed
    e = Embed(kh, kw, dh, dw, ph, pw, P - ph, P - pw)
    w = torch.zeros(weight.shape[0], weight.shape[1], K, K, dtype=weight.dtype)
    w[:, :, e.top:e.top + eh:dh, e.left:e.left + ew:dw] = weight
    return w, P, e


class FallbackConv(nn.Module):
    """A conv the generated kernels do not cover (e.g. a 7x7 stride-2 stem, a dilated or grouped conv), run by
    PyTorch (oneDNN) - but on a copy that takes the folding the native convs get: mask and BatchNorm folded into
    its weights, the activation after it fused into the same fallback op."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, True, conv.padding_mode)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(bias)
        self.conv.eval()
        self.act = "none"
        self.folded: list[str] = []

    def describe(self) -> str:
        kh, kw = self.conv.kernel_size
        fused = self.folded + ([self.act] if self.act != "none" else [])
        return (f"conv{kh}x{kw} s{self.conv.stride[0]} d{self.conv.dilation[0]} g{self.conv.groups}"
                + (f" fused: {','.join(fused)}" if fused else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.act == "relu":
            return torch.relu(y)
        if self.act == "relu6":
            return F.relu6(y)
        return y


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise SparseforgeError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
                               "data-dependent control flow is not supported by the compiler") from None
    gm = fx.GraphModule(model, graph)
    with torch.no_grad():      # (copies: a model that writes into its input must not change the caller's tensor)
        got = ShapeProp(gm).propagate(example_input.clone())
        want = model(example_input.clone())
    diff = _trace_differs(got, want)
    if diff is not None:
        raise SparseforgeError(
            f"the graph torch.fx traced from {type(model).__name__} computes something else than the model on the "
            f"example input ({diff}): forward code that tracing records differently, such as an augmented "
            "assignment into a view (z = y[:, :4]; z += 1 changes y in PyTorch, but is traced as z = z + 1) or a "
            "branch on a value; write it out of place (y = torch.cat(...), z = z + 1)")
    return gm


def _trace_differs(got, want) -> str | None:
    """How the traced graph's outputs differ from the model's on the same input, or None. Both ran the same ops
    on the same input, so anything beyond float noise means the trace lost something."""
    g = list(got) if isinstance(got, (tuple, list)) else [got]
    w = list(want) if isinstance(want, (tuple, list)) else [want]
    if len(g) != len(w):
        return f"{len(g)} outputs vs {len(w)}"
    for a, b in zip(g, w):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            continue          # (a model returning something else is refused with its own message later)
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        a_, b_ = a.double(), b.double()
        scale = float(b_[torch.isfinite(b_)].abs().max()) if torch.isfinite(b_).any() else 0.0
        bad = ~torch.isclose(a_, b_, rtol=1e-5, atol=1e-6 * max(scale, 1.0), equal_nan=True)
        if bad.any():
            worst = float((a_ - b_)[bad].abs().nan_to_num(float("inf")).max())
            return f"max difference {worst:.3g} at scale {scale:.3g}"
    return None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(tm.shape[1:])


_RELU = {F.relu, torch.relu, torch.relu_}
_ADD = {operator.add, torch.add, operator.iadd}
_FLATTEN = {torch.flatten}


def _act_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.ReLU6):
            return "relu6"
        if isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0:
            return "relu6"
    elif node.op == "call_function":
        if node.target in _RELU:
            return "relu"
        if node.target is F.relu6:
            return "relu6"
        if node.target is F.hardtanh and node.args[1:3] == (0.0, 6.0):
            return "relu6"
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


_ELT_MODULES = {nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid",
                nn.Tanh: "tanh", nn.ReLU: "relu", nn.ReLU6: "relu6"}
_ELT_FUNCTIONS = {F.silu: "silu", F.hardswish: "hardswish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                  F.hardsigmoid: "hardsigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.relu: "relu", torch.relu: "relu",
                  F.relu6: "relu6"}
_ELT_METHODS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu"}


def _eltwise_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """A standalone element-wise activation the generated code has (exact GELU included)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.GELU):
            return "gelu" if m.approximate == "none" else "gelu_tanh"
        return _ELT_MODULES.get(type(m))
    if node.op == "call_function":
        if node.target is F.gelu:
            return "gelu" if node.kwargs.get("approximate", "none") == "none" else "gelu_tanh"
        return _ELT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ELT_METHODS.get(node.target)
    return None


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _eltwise_params(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, tuple[float, float]] | None:
    """An activation with constants the generated code has: LeakyReLU (slope) or a clamp to [lo, hi] (Hardtanh,
    torch.clamp / Tensor.clamp with number bounds; a missing bound is infinite). ReLU6 is a Hardtanh and stays
    "relu6" (it folds into conv epilogues)."""
    a, kw = node.args, node.kwargs
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.LeakyReLU:
            return "leaky_relu", (float(m.negative_slope),)
        if type(m) is nn.Hardtanh:
            lo, hi = float(m.min_val), float(m.max_val)
            return ("clamp", (lo, hi)) if lo <= hi else None
        return None
    if node.op == "call_function" and node.target is F.leaky_relu:
        slope = _number(a[1] if len(a) > 1 else kw.get("negative_slope", 0.01))
        return ("leaky_relu", (slope,)) if slope is not None else None
    if node.op == "call_function" and node.target is F.hardtanh:
        lo = _number(a[1] if len(a) > 1 else kw.get("min_val", -1.0))
        hi = _number(a[2] if len(a) > 2 else kw.get("max_val", 1.0))
        return ("clamp", (lo, hi)) if lo is not None and hi is not None and lo <= hi else None
    if (node.op == "call_function" and node.target in (torch.clamp, torch.clip)) or \
            (node.op == "call_method" and node.target in ("clamp", "clip")):
        lo = a[1] if len(a) > 1 else kw.get("min")
        hi = a[2] if len(a) > 2 else kw.get("max")
        if set(kw) - {"min", "max"} or (lo is None and hi is None):
            return None
        lo_, hi_ = (-float("inf") if lo is None else _number(lo)), (float("inf") if hi is None else _number(hi))
        return ("clamp", (lo_, hi_)) if lo_ is not None and hi_ is not None and lo_ <= hi_ else None
    return None


def _is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d))  # eval mode: dropout is the identity
    if node.op == "call_function" and node.target in (F.dropout,):
        return True
    return False


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` writes its result into its first input's tensor (``nn.ReLU(inplace=True)``, ``x.relu_()``,
    ``F.relu(x, inplace=True)``, ``x += y``): later readers of that input see the result, as in PyTorch."""
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
        return node.target in (F.relu, F.relu6, F.hardswish, F.silu, F.hardsigmoid, F.elu) and \
            len(node.args) > 1 and node.args[-1] is True
    return False


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module" and isinstance(modules[node.target], nn.Flatten):
        return modules[node.target].start_dim == 1
    if node.op == "call_function" and node.target in _FLATTEN:
        return (node.args[1:2] or (node.kwargs.get("start_dim", 0),))[0] == 1
    if node.op == "call_method" and node.target == "flatten":
        return (node.args[1:2] or (node.kwargs.get("start_dim", 0),))[0] == 1
    return False


def _is_batch_size(d) -> bool:
    """Whether ``d`` reads a traced tensor's batch size: ``x.size(0)``, ``x.size()[0]``, ``x.shape[0]``. Every
    value the graph holds has the batch as its first dimension, so this is the batch of any call."""
    if not isinstance(d, fx.Node):
        return False
    if d.op == "call_method" and d.target == "size":
        return tuple(d.args[1:]) == (0,) and not d.kwargs or (d.kwargs == {"dim": 0} and len(d.args) == 1)
    if d.op == "call_function" and d.target is operator.getitem and d.args[1] == 0:
        q = d.args[0]
        return isinstance(q, fx.Node) and (
            (q.op == "call_method" and q.target == "size" and len(q.args) == 1 and not q.kwargs)
            or (q.op == "call_function" and q.target is getattr and q.args[1] == "shape"))
    return False


def _is_flatten_view(node: fx.Node, shape: tuple[int, ...]) -> bool:
    """``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``x.view(-1, C*H*W)`` and the like on a map of
    per-image ``shape``: flattening each image, for every batch size (checked on the arguments, not on the traced
    shape: ``view(1, -1)`` flattens a batch of 1 too, but not one of 2)."""
    if len(shape) != 3:
        return False
    if node.op == "call_method" and node.target in ("view", "reshape"):
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.reshape:
        dims = node.args[1:2]
    else:
        return False
    if node.kwargs:
        return False
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if len(dims) != 2:
        return False
    n = int(shape[0] * shape[1] * shape[2])
    return (dims[0] == -1 and dims[1] == n) or (_is_batch_size(dims[0]) and dims[1] in (-1, n))


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for a in target.split("."):
        obj = getattr(obj, a)
    return obj.detach().clone() if isinstance(obj, torch.Tensor) else obj


def _pool_params(node: fx.Node, modules: dict[str, nn.Module]) -> tuple | None:
    """A max or average pool, module or function: (mode, kernel, stride, padding, ceil_mode, count_include_pad,
    whether the generated pool runs it: square, no dilation, indices or divisor override); None for anything else."""
    if node.op == "call_module" and isinstance(modules[node.target], (nn.MaxPool2d, nn.AvgPool2d)):
        m = modules[node.target]
        mode = "max" if isinstance(m, nn.MaxPool2d) else "avg"
        kv = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
              "ceil_mode": getattr(m, "ceil_mode", False), "count_include_pad": getattr(m, "count_include_pad", True),
              "dilation": getattr(m, "dilation", 1), "return_indices": getattr(m, "return_indices", False),
              "divisor_override": getattr(m, "divisor_override", None)}
    elif node.op == "call_function" and node.target in (F.max_pool2d, F.avg_pool2d):
        mode = "max" if node.target is F.max_pool2d else "avg"
        names = (["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"] if mode == "max"
                 else ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"])
        if len(node.args) - 1 > len(names):
            return None
        kv = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
              "count_include_pad": True, "divisor_override": None}
        kv.update(zip(names, node.args[1:]))
        kv.update(node.kwargs)
        if "kernel_size" not in kv or any(isinstance(v, fx.Node) for v in kv.values()):
            return None
        if kv["stride"] in (None, [], ()):
            kv["stride"] = kv["kernel_size"]
    else:
        return None

    def one(v):
        v = (v,) if isinstance(v, int) else tuple(v)
        return v[0] if len(set(v)) == 1 and len(v) in (1, 2) else None

    k, s, pad, dil = one(kv["kernel_size"]), one(kv["stride"]), one(kv["padding"]), one(kv["dilation"])
    ok = (None not in (k, s, pad) and dil == 1 and not kv["return_indices"] and kv["divisor_override"] is None)
    return (mode, k or 0, s or 0, pad or 0, bool(kv["ceil_mode"]), bool(kv["count_include_pad"]), ok)


_INTERPOLATE = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def _resize_params(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, bool, tuple | None] | None:
    """``F.interpolate`` or an ``nn.Upsample`` module, nearest or bilinear without antialiasing: (mode,
    align_corners, the scale factors PyTorch's kernel gets or None when it takes them from the sizes); None for
    anything else. A size may be computed in forward (``size=skip.shape[-2:]``): only the output size matters."""
    if node.op == "call_module" and isinstance(modules[node.target], nn.Upsample):
        m = modules[node.target]
        kv = {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode, "align_corners": m.align_corners,
              "recompute_scale_factor": m.recompute_scale_factor, "antialias": False}
    elif node.op == "call_function" and node.target is F.interpolate:
        if len(node.args) - 1 > len(_INTERPOLATE):
            return None
        kv = {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
              "recompute_scale_factor": None, "antialias": False}
        kv.update(zip(_INTERPOLATE, node.args[1:]))
        kv.update(node.kwargs)
    else:
        return None
    if kv["mode"] not in ("nearest", "bilinear") or kv["antialias"] \
            or any(isinstance(kv[k], fx.Node) for k in _INTERPOLATE if k != "size"):
        return None
    scales = None
    if kv["size"] is None and kv["scale_factor"] is not None and not kv["recompute_scale_factor"]:
        sf = kv["scale_factor"]
        sf = tuple(sf) if isinstance(sf, (tuple, list)) else (sf, sf)
        if len(sf) != 2 or not all(isinstance(v, (int, float)) for v in sf):
            return None
        scales = (float(sf[0]), float(sf[1]))
    return kv["mode"], bool(kv["align_corners"]) and kv["mode"] == "bilinear", scales


def _linear_axis(n_in: int, n_out: int, align_corners: bool, scale: float | None) -> tuple[list, list]:
    """ATen's linear source indices and weights for one axis (area_pixel_compute_scale, ..._source_index,
    guard_index_and_lambda), in float32 as its CPU kernel computes them for float maps: per output index
    (i0, i0 + 1 or i0 at the last row) and (1 - lambda, lambda)."""
    f = np.float32
    if n_in == n_out:           # PyTorch copies an axis that keeps its size, whatever scale it was given
        return [i for i in range(n_out) for _ in (0, 1)], [1.0, 0.0] * n_out
    if align_corners:
        sc = f(n_in - 1) / f(n_out - 1) if n_out > 1 else f(0)
    else:
        sc = f(1.0 / scale) if scale is not None and scale > 0 else f(n_in) / f(n_out)
    idx, wts = [], []
    for i in range(n_out):
        if align_corners:
            real = f(sc * f(i))
        else:
            real = f(f(sc * f(f(i) + f(0.5))) - f(0.5))
            real = f(0) if real < 0 else real
        i0 = min(int(np.floor(real)), n_in - 1)
        lam = min(max(f(real - f(i0)), f(0)), f(1))
        idx += [i0, i0 + (1 if i0 < n_in - 1 else 0)]
        wts += [float(f(f(1) - lam)), float(lam)]
    return idx, wts


def resize_tables(mode: str, align_corners: bool, scales: tuple | None, in_hw: tuple[int, int],
                  out_hw: tuple[int, int]) -> tuple[list, list, list, list] | None:
    """(ys, yw, xs, xw) for ``ResizeOp``, checked against PyTorch on probes (None if they disagree: the op then
    falls back). Nearest: PyTorch's own choice of pixel, read off a probe of positions (float64, exact).
    Bilinear: ``_linear_axis``, within float rounding of PyTorch on a random probe (an ulp of a weight moves a
    pixel by ~1e-6; a wrong pixel or weight by far more)."""
    (h, w), (ho, wo) = in_hw, out_hw
    kw = dict(scale_factor=scales, recompute_scale_factor=False) if scales is not None else dict(size=(ho, wo))
    if mode == "nearest":
        probe = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
        r = F.interpolate(probe, mode="nearest", **kw)
        if tuple(r.shape[2:]) != (ho, wo):
            return None
        ys = [int(v) // w for v in r[0, 0, :, 0]]
        xs = [int(v) % w for v in r[0, 0, 0, :]]
        want = probe[0, 0][ys][:, xs]
        return (ys, [], xs, []) if torch.equal(r[0, 0], want) else None
    ys, yw = _linear_axis(h, ho, align_corners, scales[0] if scales else None)
    xs, xw = _linear_axis(w, wo, align_corners, scales[1] if scales else None)
    g = torch.Generator().manual_seed(0)
    probe = torch.rand(1, 2, h, w, generator=g) * 4 - 2
    r = F.interpolate(probe, mode="bilinear", align_corners=align_corners, **kw)
    if tuple(r.shape[2:]) != (ho, wo):
        return None
    Y0, Y1 = torch.tensor(ys[0::2]), torch.tensor(ys[1::2])
    X0, X1 = torch.tensor(xs[0::2]), torch.tensor(xs[1::2])
    H0, H1 = torch.tensor(yw[0::2]).view(-1, 1), torch.tensor(yw[1::2]).view(-1, 1)
    W0, W1 = torch.tensor(xw[0::2]), torch.tensor(xw[1::2])
    p = probe[0]
    mine = ((p[:, Y0][:, :, X0] * W0 + p[:, Y0][:, :, X1] * W1) * H0
            + (p[:, Y1][:, :, X0] * W0 + p[:, Y1][:, :, X1] * W1) * H1)
    return (ys, yw, xs, xw) if torch.allclose(mine, r[0], rtol=1e-5, atol=1e-5) else None


_SCALAR_OPS = {operator.add: "add", torch.add: "add", "add": "add", operator.iadd: "add", "add_": "add",
               operator.sub: "sub", torch.sub: "sub", "sub": "sub", operator.isub: "sub", "sub_": "sub",
               operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.imul: "mul", "mul_": "mul",
               operator.truediv: "div", torch.div: "div", "div": "div", operator.itruediv: "div", "div_": "div"}


def _scalar_affine(node: fx.Node) -> tuple[float, float] | None:
    """(scale, shift) when ``node`` is a tensor plus, minus, times or divided by a Python number (either side,
    except a number divided by a tensor); None otherwise."""
    if node.op not in ("call_function", "call_method") or len(node.args) != 2 or node.kwargs:
        return None
    try:
        kind = _SCALAR_OPS.get(node.target)
    except TypeError:           # an unhashable target
        return None
    a, b = node.args
    if kind is None or isinstance(a, fx.Node) == isinstance(b, fx.Node):
        return None
    num = b if isinstance(a, fx.Node) else a
    if type(num) not in (int, float) or not math.isfinite(num):
        return None
    return _affine_terms(kind, isinstance(a, fx.Node), float(num))      # (left: the tensor is the left operand)


def _affine_terms(kind: str, left: bool, t):
    """(scale, shift) of x + t, x - t, t - x, x * t or x / t (``left``: x is the left operand) for a number or a
    per-channel tensor ``t``; None for t / x, or a divisor whose reciprocal is not a normal float32 (then
    x * (1 / t) is x / t to within a rounding)."""
    if kind == "add":
        return 1.0, t
    if kind == "sub":
        return (1.0, -t) if left else (-1.0, t)
    if kind == "mul":
        return t, 0.0
    normal = (abs(t) > 1e-30) & (abs(t) < 1e30)
    if kind == "div" and left and bool(normal.all() if isinstance(normal, torch.Tensor) else normal):
        return 1.0 / t, 0.0
    return None


def _const_affine(node: fx.Node, const: dict[fx.Node, torch.Tensor], channels: int
                  ) -> tuple[fx.Node, torch.Tensor, torch.Tensor] | None:
    """(the map operand, scale[c], shift[c]) when ``node`` is a map plus, minus, times or divided by a constant
    tensor that is one number or one per channel ((C,1,1) or (1,C,1,1): ConvNeXt's and CaiT's layer scale, a
    normalisation written in forward) - a per-channel affine, as a Python number is in ``_scalar_affine``; None
    for anything else (a tensor of other shape broadcasts along other axes, another dtype promotes)."""
    if node.op not in ("call_function", "call_method") or len(node.args) != 2 or node.kwargs:
        return None
    try:
        kind = _SCALAR_OPS.get(node.target)
    except TypeError:
        return None
    a, b = node.args
    if kind is None or not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or (a in const) == (b in const):
        return None
    left = b in const
    x, t = (a, const[b]) if left else (b, const[a])
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() > 4:
        return None
    if t.numel() != 1 and not (t.dim() >= 3 and tuple(t.shape[-3:]) == (channels, 1, 1)
                               and all(d == 1 for d in t.shape[:-3])):
        return None
    terms = _affine_terms(kind, left, t.detach().float().reshape(-1).expand(channels))
    if terms is None:
        return None
    return (x, *(torch.as_tensor(v, dtype=torch.float32).expand(channels).clone() for v in terms))


def _is_gap(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return node.args[1] in (1, (1, 1))
    if ((node.op == "call_method" and node.target == "mean")
            or (node.op == "call_function" and node.target is torch.mean)):
        # x.mean((2, 3)) / torch.mean(x, [-2, -1], keepdim=...): timm's squeeze-excite and heads; without keepdim
        # the (C,) result is the same memory as the (C,1,1) one
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (isinstance(dims, (tuple, list)) and tuple(sorted(dims)) in ((2, 3), (-2, -1))
                and set(node.kwargs) <= {"dim", "keepdim"} and len(node.args) <= 3)
    return False


def _same_or_broadcast(values: dict[int, Value], a: int, b: int) -> bool:
    """Equal per-image shapes, or a (C,H,W) map with a (C,1,1) per-channel value."""
    sa, sb = tuple(values[a].shape), tuple(values[b].shape)
    if sa == sb and len(sa) in (1, 3):
        return True
    return len(sa) == len(sb) == 3 and sa[0] == sb[0] and (sa[1:] == (1, 1) or sb[1:] == (1, 1))


def _cat_dim(node: fx.Node) -> int | None:
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return 1 if d in (1, -3) else None


def _is_identity_pool(node: fx.Node, modules: dict[str, nn.Module], shape: tuple[int, ...]) -> bool:
    if len(shape) != 3:
        return False
    if node.op == "call_module" and isinstance(modules[node.target], (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = modules[node.target].output_size
    elif node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    else:
        return False
    size = (size, size) if isinstance(size, int) else tuple(size)
    size = tuple(shape[1 + i] if v is None else v for i, v in enumerate(size))
    return size == tuple(shape[1:])


# Code that only moves data (views, transposes, chunks, slices) and the size arithmetic feeding it: a run of these
# from one map to another map of the same height and width may be a channel gather (channel_gathers)
_MOVE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "chunk", "split", "tensor_split", "flatten",
                 "unflatten", "narrow", "size", "unsqueeze", "squeeze", "flip", "roll", "swapaxes", "movedim",
                 "clone", "detach"}
_MOVE_FUNCTIONS = {operator.getitem, torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.unflatten,
                   torch.chunk, torch.split, torch.tensor_split, torch.narrow, torch.squeeze, torch.unsqueeze,
                   torch.flip, torch.roll, torch.swapaxes, torch.movedim, torch.clone}
_SIZE_ARITHMETIC = {operator.floordiv, operator.mul, operator.add, operator.sub, operator.neg}


def _moves(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _MOVE_METHODS
    if node.op == "call_function":
        if node.target in _SIZE_ARITHMETIC:     # on sizes only (ShapeProp left no tensor there): on maps it computes
            return "tensor_meta" not in node.meta
        return (node.target in _MOVE_FUNCTIONS
                or (node.target is getattr and len(node.args) == 2 and node.args[1] == "shape"))
    return False


def channel_gathers(gm: fx.GraphModule) -> dict[fx.Node, tuple[fx.Node, tuple[int, ...]]]:
    """Map-valued nodes that select, reorder or repeat whole channels of one other map: node -> (that map's node,
    the input channel of each output channel). A candidate is a run of data-moving nodes (``_moves``) back to one
    tensor node; it is run on probes whose every element is its own position (int64), for two batch sizes, and kept
    only if each output plane equals one input plane of the same image, element for element. The probes prove the
    mapping for the model's own code -- ``chunk``, ``split``, ``x[:, a:b]``, ShuffleNet's view-transpose-view with
    any number of groups -- instead of matching the ways it can be written."""
    found: dict[fx.Node, tuple[fx.Node, tuple[int, ...]]] = {}
    for node in gm.graph.nodes:
        shape = _shape(node)
        if not _moves(node) or shape is None or len(shape) != 3:
            continue
        chain, sources, stack = set(), set(), [node]
        while stack and len(sources) <= 1:
            n = stack.pop()
            if n in chain or n in sources:
                continue
            if _moves(n):
                chain.add(n)
                stack += n.all_input_nodes
            else:
                sources.add(n)
        if len(sources) != 1:
            continue
        src = next(iter(sources))
        sshape = _shape(src)
        if src.op not in ("placeholder", "call_module", "call_function", "call_method") or sshape is None \
                or len(sshape) != 3 or tuple(sshape[1:]) != tuple(shape[1:]):
            continue
        order = [n for n in gm.graph.nodes if n in chain]
        index = [_probe_index(order, src, node, sshape, shape, batch) for batch in (2, 3)]
        if index[0] is not None and index[0] == index[1]:
            found[node] = (src, index[0])
    return found


def _probe_index(order: list[fx.Node], src: fx.Node, node: fx.Node, sshape: tuple, shape: tuple,
                 batch: int) -> tuple[int, ...] | None:
    """``node``'s input channel per output channel, from running ``order`` on a position probe of ``src``, or None
    if some output plane is not one input plane of the same image (or the code does not run on the probe)."""
    c, h, w = sshape
    probe = torch.arange(batch * c * h * w, dtype=torch.int64).view(batch, c, h, w)
    vals: dict[fx.Node, object] = {src: probe}
    try:
        for n in order:
            args = fx.node.map_arg(n.args, lambda a: vals[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: vals[a])
            vals[n] = (getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method"
                       else n.target(*args, **kwargs))
    except Exception:
        return None
    r = vals[node]
    if not isinstance(r, torch.Tensor) or tuple(r.shape) != (batch, *shape):
        return None
    ix = tuple(int(v) for v in (r[0, :, 0, 0] // (h * w)) % c)
    return ix if torch.equal(r, probe[:, list(ix)]) else None


# ops whose result may share its input's storage (a view): a write into one is seen through the other
_VIEW_METHODS = (_MOVE_METHODS - {"size", "clone", "flip", "roll"}) | {"expand", "expand_as", "view_as", "t",
                                                                        "select", "unbind", "unfold", "diagonal"}
_VIEW_FUNCTIONS = (_MOVE_FUNCTIONS - {torch.clone, torch.flip, torch.roll}) | {torch.select, torch.unbind,
                                                                               torch.diagonal}


def _views_of(node: fx.Node) -> fx.Node | None:
    """The node whose storage ``node`` may share (its first input) if ``node`` may be a view of it."""
    viewing = ((node.op == "call_method" and node.target in _VIEW_METHODS)
               or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS))
    base = node.args[0] if node.args else None
    return base if viewing and isinstance(base, fx.Node) else None


def aliased_write(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> str | None:
    """Why the model cannot be compiled as written, or None: an in-place op writes into a tensor that shares
    storage with another one (a view of it, or the tensor it views) made before the write and read after it.
    PyTorch's reader sees the write through the shared storage; the compiler's values are copies, so it would
    not. (A write into a tensor no other view of it outlives is the same as writing out of place, and is fine.)"""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    base: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        b = _views_of(n)
        if b is not None:
            base[n] = base.get(b, b)
    group: dict[fx.Node, list[fx.Node]] = {}
    for n, b in base.items():
        group.setdefault(b, [b]).append(n)
    for u in gm.graph.nodes:
        if not (_in_place(u, modules) and u.args and isinstance(u.args[0], fx.Node)):
            continue
        t = u.args[0]
        for m in group.get(base.get(t, t), []):
            if m is t or order[m] > order[u]:
                continue
            later = [r for r in m.users if order[r] > order[u]]
            if later:
                return (f"{u.name} writes in place into {t.name}, which shares storage with {m.name} (a view), and "
                        f"{later[0].name} reads {m.name} after the write: the compiler keeps views as copies, so it "
                        "would not see it; write the op out of place (y = y * 2 instead of y.mul_(2), "
                        "F.relu(y) instead of F.relu(y, inplace=True))")
    return None


def build_ir(gm: fx.GraphModule, embed_max_kernels: float = 0.5, embed_grouped: bool = False,
             channel_ops: bool = True, resize_ops: bool = True) -> Graph:
    """``embed_max_kernels``: dilated and non-square convs with at most this fraction of their kernels kept run
    embedded in a square kernel (``embed_conv``; PlanOptions.embed_max_kernels), the others in oneDNN; grouped
    ones only with ``embed_grouped``. ``channel_ops``, ``resize_ops``: channel gathers (``channel_gathers``) and
    nearest/bilinear resizes as native ops (the int8 engine, which has no kernel for them, keeps them as
    fallbacks)."""
    modules = dict(gm.named_modules())
    why = aliased_write(gm, modules)
    if why is not None:
        raise SparseforgeError(why)
    gathers = channel_gathers(gm) if channel_ops else {}
    values: dict[int, Value] = {}
    ops: list[Op] = []
    env: dict[fx.Node, int] = {}
    producer: dict[int, Op] = {}
    inputs: list[int] = []
    outputs: list[int] = []

    def new_value(node: fx.Node, shape=None) -> int:
        vid = len(values)
        values[vid] = Value(vid, shape if shape is not None else (_shape(node) or ()), node.name)
        env[node] = vid
        return vid

    def transparent(u: fx.Node) -> bool:
        """A node that stands for its input's value unchanged (identity, dropout, a pool to the map's own size)."""
        if _is_identity(u, modules):
            return True
        ins = u.all_input_nodes
        return bool(ins) and _is_identity_pool(u, modules, _shape(ins[0]) or ())

    def consumers(node: fx.Node) -> list[fx.Node]:
        out = []
        for u in node.users:
            out += consumers(u) if transparent(u) else [u]
        return out

    def only_user(node: fx.Node) -> bool:
        """Whether the value ``node`` holds has one consumer: folding into its producer changes it for every
        reader, and an identity module (RepGhost's fusion branch) can hide a second reader behind an alias."""
        while transparent(node) and node.all_input_nodes:
            node = node.all_input_nodes[0]
        return len(consumers(node)) == 1

    # nodes that hold no batched tensor -- sizes and shapes (``x.size(0)``, ``c // groups``), parameters read in
    # forward (``self.layer_scale``), tuples of tensors (``x.chunk(2, 1)``) -- as expressions that the fallback
    # ops reading them evaluate when they run, on that call's tensors (so a batch size is the call's own)
    deferred: dict[fx.Node, tuple] = {}
    moving: set[int] = set()      # fallback ops of data-moving nodes (dropped at the end if nothing reads them)

    def sub(a):
        if isinstance(a, fx.Node):
            return deferred[a] if a in deferred else ("__value__", env[a])
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        if isinstance(a, dict):
            return {k: sub(v) for k, v in a.items()}
        return a

    def refs(a, out: list[int]) -> list[int]:
        """The value ids a substituted argument structure reads, its expressions' included."""
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "__value__":
            if a[1] not in out:
                out.append(a[1])
        elif isinstance(a, tuple) and a and a[0] == "__expr__":
            refs(a[3], out)
            refs(a[4], out)
        elif isinstance(a, (list, tuple)):
            for x in a:
                refs(x, out)
        elif isinstance(a, dict):
            for x in a.values():
                refs(x, out)
        return out

    def fallback(node: fx.Node, reason: str) -> None:
        target = modules[node.target] if node.op == "call_module" else node.target
        call = {"call_module": "module", "call_function": "function", "call_method": "method"}[node.op]
        args, kwargs = sub(node.args), sub(dict(node.kwargs))
        shape = _shape(node)
        if shape is None:
            deferred[node] = ("__expr__", call, target, args, kwargs)
            return
        out = new_value(node, shape)
        op = TorchOp(node.target if node.op == "call_module" else node.name, refs((args, kwargs), []), out,
                     target=target, call=call, args=args, kwargs=kwargs, reason=reason)
        ops.append(op)
        producer[out] = op
        if _moves(node):
            moving.add(id(op))

    pending: tuple[fx.Node, int] | None = None     # an in-place node and the value it overwrote

    def settle_in_place() -> None:
        """After an in-place node: every name of the tensor it wrote (its input, and that input's aliases) now
        stands for its result, so readers later in the graph get what PyTorch's mutated tensor holds."""
        nonlocal pending
        if pending is not None:
            node_, old = pending
            new = env.get(node_)
            if new is not None and new != old:
                for k in [k for k, v in env.items() if v == old]:
                    env[k] = new
            pending = None

    for node in gm.graph.nodes:
        settle_in_place()
        if node.op == "placeholder":
            vid = new_value(node)
            inputs.append(vid)
            continue
        if _in_place(node, modules) and node.all_input_nodes and node.all_input_nodes[0] in env:
            pending = (node, env[node.all_input_nodes[0]])
        if node.op == "output":
            res = node.args[0]
            for r in (res if isinstance(res, (list, tuple)) else [res]):
                if r not in env:
                    raise SparseforgeError(f"the model returns {r}, which is not a batched tensor; the compiler takes "
                                           "models that return a tensor or a tuple of tensors")
                outputs.append(env[r])
            continue
        if node.op == "get_attr":
            deferred[node] = ("__const__", _attr(gm, node.target))
            continue

        args = [a for a in node.all_input_nodes]
        src = env.get(args[0]) if args else None
        prod = producer.get(src) if src is not None else None
        if node in gathers and gathers[node][0] in env and len(values[env[gathers[node][0]]].shape) == 3:
            # chunk, split, a channel slice, a channel shuffle: planes copied (nothing when it is every channel
            # in order); the view/transpose nodes before it become fallback ops nobody reads, dropped at the end
            g_src, g_ix = env[gathers[node][0]], gathers[node][1]
            if g_ix == tuple(range(values[g_src].shape[0])):
                env[node] = g_src
                continue
            out = new_value(node)
            op = GatherOp(node.name, [g_src], out, index=g_ix)
            ops.append(op)
            producer[out] = op
            continue
        # flatten, written as a module, torch.flatten or a view/reshape of each image (whose size arguments are
        # deferred expressions, so before the test below)
        if src is not None and (_is_flatten(node, modules) or _is_flatten_view(node, values[src].shape)):
            if isinstance(prod, GapOp) and only_user(args[0]):
                # (C,1,1) -> (C,): same memory in the native layout of a GAP result
                values[src].shape = (values[src].shape[0],)
                env[node] = src
                continue
            if len(values[src].shape) == 3:
                out = new_value(node, (int(np.prod(values[src].shape)),))
                op = FlattenOp(node.name, [src], out)
                ops.append(op)
                producer[out] = op
                continue
        consts = {a: deferred[a][1] for a in args if a in deferred and deferred[a][0] == "__const__"}
        x_ = next((a for a in args if a not in deferred and a in env), None)
        aff = (_const_affine(node, consts, values[env[x_]].shape[0])
               if consts and x_ is not None and len(values[env[x_]].shape) == 3 and len(args) == 2 else None)
        if aff is not None and _shape(node) == tuple(values[env[x_]].shape):
            px = producer.get(env[x_])
            if isinstance(px, ConvOp) and only_user(x_) and px.act == "none" and px.residual is None:
                # into the conv before it, as a BatchNorm is
                px.weight = px.weight * aff[1].view(-1, 1, 1, 1)
                px.bias = px.bias * aff[1] + aff[2]
                px.folded.append("scale")
                env[node] = env[x_]
                continue
            out = new_value(node, values[env[x_]].shape)
            op = EltwiseOp(node.name, [env[aff[0]]], out, fn="affine", scale=aff[1], shift=aff[2])
            ops.append(op)
            producer[out] = op
            continue
        rz = (_resize_params(node, modules) if resize_ops and node.args and isinstance(node.args[0], fx.Node)
              and node.args[0] in env else None)
        rsrc = env[node.args[0]] if rz is not None else None
        if rz is not None and len(values[rsrc].shape) == 3 and len(_shape(node) or ()) == 3 \
                and _shape(node)[0] == values[rsrc].shape[0]:
            tables = resize_tables(*rz, tuple(values[rsrc].shape[1:]), tuple(_shape(node)[1:]))
            if tables is not None:
                out = new_value(node)
                op = ResizeOp(node.target if node.op == "call_module" else node.name, [rsrc], out, mode=rz[0],
                              align_corners=rz[1], scales=rz[2], ys=tables[0], yw=tables[1], xs=tables[2],
                              xw=tables[3])
                ops.append(op)
                producer[out] = op
                continue
        if any(a in deferred for a in args) or src is None and args:
            fallback(node, "reads a size, shape, tuple or parameter computed in forward")
            continue

        # ---- aliases ------------------------------------------------------
        if _is_identity(node, modules):
            env[node] = src
            continue
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            m = modules[node.target]
            w = m.weight.detach().float().clone()
            mask = getattr(m, "weight_mask", None)
            folded = []
            if isinstance(mask, torch.Tensor):
                w = w * mask
                folded.append("mask")
            b = m.bias.detach().float().clone() if m.bias is not None else torch.zeros(w.shape[0])
            # 1x1, 3x3, 5x5 and 7x7, stride 1 or 2, padding up to half the kernel: padding past the layout's
            # one-pixel border and kernels over 3x3 with stride 2 are lowered (plan.lower: a PhaseOp + an
            # unpadded stride-1 conv; a depthwise one becomes a grouped conv of s*s phase channels per group)
            # grouped convs of any kind (depthwise, ResNeXt's, ShuffleNet's 1x1): each filter's kernels index
            # the channels of its own group (plan_conv), so no kernel outside it is ever read. Dilated and
            # non-square kernels run embedded in a square one (embed_conv)
            emb = None
            if (m.padding_mode == "zeros" and m.stride[0] == m.stride[1] and m.stride[0] in (1, 2)
                    and isinstance(m.padding, tuple)):
                emb = embed_conv(m.kernel_size, m.dilation, m.padding, w)
            # (grouped and depthwise ones too: onnxruntime's and oneDNN's depthwise kernels beat the embedded one
            # in every arm measured)
            dense = (emb is not None and emb[2] is not None
                     and ((m.groups > 1 and not embed_grouped)
                          or float((w.flatten(2) != 0).any(2).float().mean()) > embed_max_kernels))
            if emb is None or dense:
                fallback(node, "a dilated or non-square conv, grouped or keeping most kernels: oneDNN" if dense else
                         "no generated kernel for this conv shape: oneDNN")
                op_ = ops[-1]
                op_.target = FallbackConv(m, w, b)
                op_.target.folded = folded
                op_.call = "module"
                continue
            out = new_value(node)
            w, pad, e = emb
            op = ConvOp(node.target, [src], out, weight=w, bias=b, stride=m.stride[0], padding=pad,
                        groups=m.groups, folded=folded, embed=e)
            ops.append(op)
            producer[out] = op
            continue
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            bn = modules[node.target]
            parent = next(iter(args))
            if (isinstance(prod, ConvOp) and only_user(parent) and prod.act == "none" and prod.residual is None
                    and not bn.training and bn.running_mean is not None and bn.affine):
                scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
                prod.weight = prod.weight * scale.view(-1, 1, 1, 1)
                prod.bias = (prod.bias - bn.running_mean.float()) * scale + bn.bias.detach().float()
                prod.folded.append("bn")
                env[node] = src
                continue
            if (isinstance(prod, TorchOp) and isinstance(prod.target, FallbackConv) and only_user(parent)
                    and prod.target.act == "none" and not bn.training and bn.running_mean is not None and bn.affine):
                fc = prod.target.conv
                scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
                with torch.no_grad():
                    fc.weight.mul_(scale.view(-1, 1, 1, 1))
                    fc.bias.copy_((fc.bias - bn.running_mean.float()) * scale + bn.bias.detach().float())
                prod.target.folded.append("bn")
                env[node] = src
                continue
            if not bn.training and bn.running_mean is not None and len(values[src].shape) == 3:
                scale = torch.ones(bn.num_features) if not bn.affine else bn.weight.detach().float().clone()
                scale = scale / torch.sqrt(bn.running_var.float() + bn.eps)
                shift = (bn.bias.detach().float() if bn.affine else torch.zeros(bn.num_features)) \
                    - bn.running_mean.float() * scale
                out = new_value(node)
                op = EltwiseOp(node.target, [src], out, fn="affine", scale=scale, shift=shift)
                ops.append(op)
                producer[out] = op
                continue
            fallback(node, "BatchNorm in training mode or without running statistics")
            continue
        act = _act_of(node, modules)
        if act is not None:
            parent = args[0]
            if isinstance(prod, (ConvOp, LinearOp)) and only_user(parent) and prod.act == "none":
                prod.act = act
                env[node] = src
                continue
            if act == "relu" and isinstance(prod, (ConvOp, LinearOp)) and prod.act in ("relu", "relu6"):
                env[node] = src      # relu of a non-negative value (e.g. a dropped residual branch's relu(x))
                continue
            if (isinstance(prod, TorchOp) and isinstance(prod.target, FallbackConv) and only_user(parent)
                    and prod.target.act == "none"):
                prod.target.act = act
                env[node] = src
                continue
            if len(args) == 1 and len(values[src].shape) in (1, 3):
                out = new_value(node)
                op = EltwiseOp(node.name, [src], out, fn=act)
                ops.append(op)
                producer[out] = op
                continue
            fallback(node, "activation not after a conv")
            continue
        fn, params = _eltwise_params(node, modules) or (_eltwise_of(node, modules), ())
        if fn is not None and len(args) == 1 and len(values[src].shape) in (1, 3) and fn != "gelu_tanh":
            out = new_value(node)
            op = EltwiseOp(node.name, [src], out, fn=fn, params=params)
            ops.append(op)
            producer[out] = op
            continue
        aff = _scalar_affine(node) if src is not None and len(values[src].shape) == 3 and len(args) == 1 else None
        if aff is not None:
            # x + a, x - a, a - x, x * a, x / a with a Python number: a per-channel affine with equal channels
            c_ = values[src].shape[0]
            out = new_value(node, values[src].shape)
            op = EltwiseOp(node.name, [src], out, fn="affine", scale=torch.full((c_,), aff[0]),
                           shift=torch.full((c_,), aff[1]))
            ops.append(op)
            producer[out] = op
            continue
        if node.op in ("call_function", "call_method") and node.target in (_ADD | {"add", "add_"}) \
                and len(args) == 2 and len(node.args) == 2 and not node.kwargs:
            a, b_ = args
            fused = False
            # the conv that takes the add into its epilogue reads the other operand, so that operand must exist
            # before the conv runs: of two conv branches (a projection shortcut: bn(conv1x1(x)) is traced after
            # the main branch) the later one takes the add
            def pos(vid: int) -> int:
                p_ = producer.get(vid)
                return next((i for i, o in enumerate(ops) if o is p_), -1)

            def pad_shortcut(node_: fx.Node) -> TorchOp | None:
                po_ = producer.get(env[node_])
                return po_ if (isinstance(po_, TorchOp) and po_.call == "module"
                               and isinstance(po_.target, PadShortcut) and only_user(node_)) else None

            def read(node_: fx.Node) -> int:      # the value the epilogue reads (a pad shortcut's input)
                ps = pad_shortcut(node_)
                return ps.inputs[0] if ps is not None else env[node_]

            pairs = sorted(((a, b_), (b_, a)), key=lambda fo: -pos(env[fo[0]]))
            for first, other in pairs:
                p = producer.get(env[first])
                if isinstance(p, ConvOp) and only_user(first) and p.act == "none" and p.residual is None \
                        and values[env[first]].shape == values[env[other]].shape \
                        and pos(read(other)) < pos(env[first]):
                    po = pad_shortcut(other)
                    if po is not None:
                        # read the option-A shortcut in place: drop its materialisation
                        ops.remove(po)
                        p.residual = po.inputs[0]
                        p.res_kind = "pad_shortcut"
                        p.res_stride = po.target.stride
                        p.res_pad_before = po.target.pad_before
                    else:
                        p.residual = env[other]
                    env[node] = env[first]
                    fused = True
                    break
            if fused:
                continue
            if _same_or_broadcast(values, env[a], env[b_]):
                va, vb = env[a], env[b_]
                if values[va].shape != values[vb].shape and values[va].shape[1:] == (1, 1):
                    va, vb = vb, va         # the full map first, the (C,1,1) value second
                out = new_value(node, values[va].shape)
                op = EltwiseOp(node.name, [va, vb], out, fn="add")
                ops.append(op)
                producer[out] = op
                continue
            fallback(node, "add of values with different shapes")
            continue
        if node.op in ("call_function", "call_method") and node.target in (operator.mul, torch.mul, "mul", "mul_",
                                                                            operator.imul) \
                and len(args) == 2 and len(node.args) == 2 and not node.kwargs \
                and _same_or_broadcast(values, env[args[0]], env[args[1]]):
            a, b_ = env[args[0]], env[args[1]]
            if values[a].shape != values[b_].shape and values[a].shape[1:] == (1, 1):
                a, b_ = b_, a       # the full map first, the (C,1,1) scale second
            out = new_value(node, values[a].shape)
            op = EltwiseOp(node.name, [a, b_], out, fn="mul")
            ops.append(op)
            producer[out] = op
            continue
        if node.op == "call_function" and node.target is torch.cat and _cat_dim(node) == 1 \
                and all(isinstance(t, fx.Node) for t in node.args[0]) \
                and all(len(values[env[t]].shape) == 3 for t in node.args[0]) \
                and len({values[env[t]].shape[1:] for t in node.args[0]}) == 1:
            out = new_value(node)
            op = ConcatOp(node.name, [env[t] for t in node.args[0]], out)
            ops.append(op)
            producer[out] = op
            continue
        pool = _pool_params(node, modules)
        if pool is not None:
            mode, k, s, pad, ceil, include_pad, ok = pool
            # ceil_mode: the windows past the map's end are clipped as padding is (an average's divisor there
            # counts the padding but not the overhang: codegen.pool_source)
            if ok and 1 <= k <= 8 and 1 <= s <= 4 and 0 <= pad <= k // 2 \
                    and len(values[src].shape) == 3:
                out = new_value(node)
                _, hi, wi = values[src].shape
                # ceil_mode only where it rounds a size up (the rest is the same pool)
                floor = ((hi + 2 * pad - k) // s + 1, (wi + 2 * pad - k) // s + 1)
                ceil = ceil and tuple(values[out].shape[1:]) != floor
                op = PoolOp(node.target if node.op == "call_module" else node.name, [src], out, mode=mode,
                            kernel=k, stride=s, padding=pad, include_pad=include_pad, ceil_mode=ceil)
                ops.append(op)
                producer[out] = op
                continue
            fallback(node, "pooling with dilation, non-square windows, or a window over 8 or stride over 4")
            continue
        if _is_identity_pool(node, modules, values[src].shape if src is not None else ()):
            env[node] = src              # adaptive pool to the size the map already has (VGG's 7x7 at 224x224)
            continue
        if _is_gap(node, modules):
            out = new_value(node)
            op = GapOp(node.name, [src], out)
            ops.append(op)
            producer[out] = op
            continue
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear) and len(values[src].shape) == 1:
            m = modules[node.target]
            w = m.weight.detach().float().clone()
            mask = getattr(m, "weight_mask", None)
            if isinstance(mask, torch.Tensor):
                w = w * mask
            b = m.bias.detach().float().clone() if m.bias is not None else torch.zeros(w.shape[0])
            out = new_value(node)
            op = LinearOp(node.target, [src], out, weight=w, bias=b)
            ops.append(op)
            producer[out] = op
            continue
        what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        fallback(node, f"no native kernel for {what}")
    # what only fed channel gathers now feeds nothing: the data-moving fallback ops before them, and a gather that
    # a later one (composed through it, e.g. a shuffle then a chunk) reads around
    live = set(outputs)
    kept: list[Op] = []
    for op in reversed(ops):
        if (isinstance(op, GatherOp) or id(op) in moving) and op.output not in live:
            continue
        live.update(Graph.reads(op))
        kept.append(op)
    return Graph(values, kept[::-1], inputs, outputs)
