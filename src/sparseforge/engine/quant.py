"""int8 post-training quantization of the folded graph, and the integer reference that defines its arithmetic.

Why on the engine's folded graph: BatchNorm, masks, activations and residual adds already sit where int8
kernels need them (in a conv's epilogue), so the quantized network is that graph plus scales, and one
quantized graph serves the reference, the ONNX QDQ export and the engine.

The arithmetic, bit for bit (the engine must equal ``QuantizedModel``'s forward exactly):

- a value is int8 (signed, scale s, zero point 0) or uint8 (scale s, zero point 0) where the op that makes it
  cannot go negative (ReLU, ReLU6, sigmoid, max/avg of uint8 ...): a zero border is a real 0 in both, so
  padding needs no zero-point correction, and ReLU is the clamp at 0 of the requantization;
- weights are symmetric int8 per output channel (``s_w[o] = max|w[o]| / 127``): a pruned weight is exactly 0;
- a conv or linear accumulates ``sum w_q * x_q`` exactly in int32 and adds ``bias_q = rint(b / (s_x s_w))``;
- every requantization is ``clamp(rint(float32(acc) * M), lo, hi)``: one int32 -> float32 conversion, one
  float32 multiply, round half to even; a residual epilogue or an add of two values is
  ``rint(float32(acc) * M + float32(r_q) * M_r)``: two products and one sum, each rounded to float32 (the
  engine compiles int8 code without fused multiply-adds, so it rounds the same three times);
- element-wise functions (SiLU, Hardswish, sigmoid, GELU, ...) are 256-entry lookup tables computed here;
  average pools and the global pool divide the exact integer sum in float32 and round;
- a graph output made by a conv or linear layer is ``float32(acc) * (s_x s_w[o])``: logits are not rounded;
- an op without an integer form (a PyTorch fallback) runs in float on dequantized inputs and is requantized:
  ``summary()`` lists it.
int8 has no NaN: a NaN input counts as 0, and +-Inf saturate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, opt
from ..errors import SparseforgeError
from .interpret import ELTWISE_FNS, eltwise_fn, residual_term, run_graph, run_torch_op
from .ir import ConcatOp, ConvOp, EltwiseOp, FlattenOp, GapOp, Graph, LinearOp, Op, PoolOp, TorchOp
from .trace import FallbackConv, build_ir, trace

ACC_LIMIT = 2 ** 31 - 1
METHODS = ("minmax", "percentile", "mse")


@dataclasses.dataclass(frozen=True)
class Int8Config(Config):
    """Post-training int8: per-channel symmetric weights, per-tensor activations calibrated on sample inputs."""

    calibration: Literal["auto", "minmax", "percentile", "mse"] = opt(
        "auto", "activation ranges: minmax, a percentile of |x|, the range minimising the squared rounding + "
        "clipping error, or auto (each of the three, keep the one with the best calibration-set accuracy, or the "
        "closest outputs to the float model when there are no labels)")
    percentile: float = opt(99.99, "the percentile of |x| for calibration = 'percentile'", min=50.0, max=100.0)
    max_images: int = opt(1024, "calibration images read at most (from the start of the iterable)", min=1)
    samples: int = opt(4096, "values sampled per tensor and batch for the percentile and mse ranges", min=64)
    seed: int = opt(0, "seed of that sampling")


@dataclasses.dataclass(frozen=True)
class QParam:
    scale: float
    signed: bool

    @property
    def lo(self) -> int:
        return -128 if self.signed else 0

    @property
    def hi(self) -> int:
        return 127 if self.signed else 255


@dataclasses.dataclass
class QOp:
    """Integer data of one op (which fields are set depends on the op)."""

    weight: torch.Tensor | None = None      # int8 values (as int32), the graph op's shape
    wscale: torch.Tensor | None = None      # float32 per output channel
    bias: torch.Tensor | None = None        # int32 per output channel
    mult: torch.Tensor | None = None        # float32: requantization multiplier (per channel or one)
    rmult: torch.Tensor | None = None       # float32 (1,): residual (or add's second input) to output units
    lut: torch.Tensor | None = None         # int32 table indexed by x_q - lo of the input
    lo: int = -128
    hi: int = 127
    float_out: bool = False                 # a graph output computed from the accumulator, not rounded
    fallback: bool = False
    exact32: bool = False                   # every partial sum of the layer is < 2^24: float32 sums are exact


@dataclasses.dataclass
class QGraph:
    graph: Graph
    params: dict[int, QParam]
    qops: list[QOp]
    method: str
    scores: dict[str, float] = dataclasses.field(default_factory=dict)


# ---- signedness and ranges ---------------------------------------------------------------------------------------
_NONNEG_FNS = {"relu", "relu6", "sigmoid", "hardsigmoid"}


def _nonnegative(graph: Graph, in_min: float) -> dict[int, bool]:
    """Values that cannot be negative, by construction (not by what calibration happened to see)."""
    nn_: dict[int, bool] = {graph.inputs[0]: in_min >= 0}
    for op in graph.ops:
        ins = [nn_.get(i, False) for i in op.inputs]
        conv = _conv_parts(op)
        if conv is not None:
            v = conv[2] in ("relu", "relu6")
        elif isinstance(op, EltwiseOp):
            v = op.fn in _NONNEG_FNS or (op.fn == "mul" and all(ins)) or (op.fn == "add" and all(ins))
        elif isinstance(op, (PoolOp, GapOp, FlattenOp, ConcatOp)):
            v = all(ins)
        else:
            v = False
        nn_[op.output] = v
    return nn_


class _Stats:
    """Per value: exact min/max and a random sample of |x| (for percentile and mse ranges)."""

    def __init__(self, samples: int, seed: int):
        self.samples, self.g = samples, torch.Generator().manual_seed(seed)
        self.amax: dict[int, float] = {}
        self.min: dict[int, float] = {}
        self.sample: dict[int, list[torch.Tensor]] = {}

    def add(self, vid: int, t: torch.Tensor) -> None:
        t = t.detach().float().flatten()
        if t.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(t))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            t = t[torch.isfinite(t)]
            if t.numel() == 0:
                return
            lo, hi = (float(v) for v in torch.aminmax(t))
        self.amax[vid] = max(self.amax.get(vid, 0.0), abs(lo), abs(hi))
        self.min[vid] = min(self.min.get(vid, math.inf), lo)
        if t.numel() > self.samples:
            t = t[torch.randint(t.numel(), (self.samples,), generator=self.g)]
        self.sample.setdefault(vid, []).append(t.abs())


def _fake_quant_error(a: torch.Tensor, amax: float, levels: int) -> float:
    s = amax / levels
    q = torch.clamp(torch.round(a / s), max=levels) * s
    return float(((a - q) ** 2).mean())


def _amax(stats: _Stats, vid: int, method: str, pct: float, levels: int) -> float:
    top = stats.amax.get(vid, 0.0)
    if top == 0.0 or method == "minmax":
        return top
    a = torch.cat(stats.sample[vid])
    if method == "percentile":
        return max(float(torch.quantile(a.double(), pct / 100.0)), top * 1e-3)
    # mse: the clipping range with the least squared error over the sample, on a grid of fractions of the max
    best, best_err = top, _fake_quant_error(a, top, levels)
    for f in torch.linspace(0.2, 1.0, 81)[:-1].tolist():
        err = _fake_quant_error(a, top * f, levels)
        if err < best_err:
            best, best_err = top * f, err
    return best


# ---- quantizing the graph ------------------------------------------------------------------------------------------
def _rint(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)       # half to even, like the CPU's default rounding mode


def _qweight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, symmetric. A channel's scale is at least 2^-12 of the layer's largest: a nearly dead
    filter (BatchNorm gamma ~ 0) would otherwise get a scale so small that its bias and residual terms overflow
    the int32 accumulator; its weights keep ~12 bits of their own range either way."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
    amax = torch.maximum(amax, amax.max() * 2.0 ** -12)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float()
    q = torch.clamp(_rint(w / s.view(-1, *([1] * (w.dim() - 1)))), -127, 127).to(torch.int32)
    return q, s


def _lut(fn: str, pin: QParam, pout: QParam, params: tuple = ()) -> torch.Tensor:
    q = torch.arange(pin.lo, pin.hi + 1, dtype=torch.float32)
    y = eltwise_fn(fn, params)(q * pin.scale)
    return torch.clamp(_rint(y / pout.scale), pout.lo, pout.hi).to(torch.int32)


def _act_bounds(act: str, p: QParam) -> tuple[int, int]:
    lo, hi = p.lo, p.hi
    if act in ("relu", "relu6"):
        lo = 0
    if act == "relu6":
        hi = min(hi, int(_rint(torch.tensor(6.0 / p.scale))))
    return lo, hi


def _conv_parts(op: Op) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """(weight, bias, activation) of an op that is an integer conv or linear layer, else None. A conv the fp32
    kernels leave to oneDNN (dilated, grouped: a FallbackConv) is still an ordinary integer conv here."""
    if isinstance(op, (ConvOp, LinearOp)):
        return op.weight, op.bias, op.act
    if isinstance(op, TorchOp) and isinstance(op.target, FallbackConv):
        c = op.target.conv
        return c.weight.detach().float(), c.bias.detach().float(), op.target.act
    return None


def _check_acc(op: Op, w: torch.Tensor, b: torch.Tensor, xmax: int) -> None:
    """Accumulators are int32: refuse a layer whose worst case could wrap (a huge bias for tiny weights)."""
    worst = w.abs().reshape(w.shape[0], -1).sum(1).double() * xmax + b.abs().double()
    if float(worst.max()) >= ACC_LIMIT:
        raise SparseforgeError(f"layer {op.name!r}: its int32 accumulator could overflow in int8 (bias or weights "
                               "out of scale); keep this layer in float or rescale it before quantizing")


def _build_qgraph(graph: Graph, stats: _Stats, method: str, cfg: Int8Config) -> QGraph:
    nonneg = _nonnegative(graph, stats.min.get(graph.inputs[0], -1.0))
    # concat inputs share the output's scale (each producer writes its slice directly): unify by max
    groups: dict[int, int] = {}

    def root(v: int) -> int:
        while groups.get(v, v) != v:
            v = groups[v]
        return v

    for op in graph.ops:
        if isinstance(op, ConcatOp):
            for i in op.inputs:
                groups[root(i)] = root(op.output)
    params: dict[int, QParam] = {}
    amax_of: dict[int, float] = {}
    signed_of: dict[int, bool] = {}
    for vid in graph.values:
        r = root(vid)
        signed = not nonneg.get(vid, False)
        levels = 127 if signed else 255
        a = _amax(stats, vid, method, cfg.percentile, levels) if vid in stats.amax else 0.0
        amax_of[r] = max(amax_of.get(r, 0.0), a)
        signed_of[r] = signed_of.get(r, False) or signed
    for vid in graph.values:
        r = root(vid)
        levels = 127 if signed_of[r] else 255
        params[vid] = QParam(float(amax_of[r] / levels) if amax_of[r] > 0 else 1.0, signed_of[r])
    # pass-through ops keep their input's parameters exactly (max pool, flatten: the same integers)
    for op in graph.ops:
        if isinstance(op, (FlattenOp,)) or (isinstance(op, PoolOp) and op.mode == "max"):
            params[op.output] = params[op.inputs[0]]
        if isinstance(op, (GapOp,)) or (isinstance(op, PoolOp) and op.mode == "avg"):
            params[op.output] = params[op.inputs[0]]
    outputs = set(graph.outputs)
    qops: list[QOp] = []
    for op in graph.ops:
        q = QOp()
        po = params[op.output]
        q.lo, q.hi = po.lo, po.hi
        conv = _conv_parts(op)
        if conv is not None:
            weight, bias, act = conv
            px = params[op.inputs[0]]
            q.weight, q.wscale = _qweight(weight)
            acc_scale = (torch.tensor(px.scale, dtype=torch.float32) * q.wscale).float()
            q.bias = torch.clamp(_rint(bias.double() / acc_scale.double()), -ACC_LIMIT, ACC_LIMIT).to(torch.int32)
            if getattr(op, "residual", None) is not None:
                pr = params[op.residual]
                q.rmult = torch.tensor([pr.scale if op.output in outputs else pr.scale / po.scale],
                                       dtype=torch.float32)
            xmax = 255 if not px.signed else 128
            _check_acc(op, q.weight, q.bias, xmax)
            q.exact32 = float(q.weight.abs().reshape(q.weight.shape[0], -1).sum(1).max()) * xmax < 2 ** 24
            if op.output in outputs:
                q.float_out, q.mult = True, acc_scale
            else:
                q.mult = (acc_scale.double() / po.scale).float()
                q.lo, q.hi = _act_bounds(act, po)
        elif isinstance(op, EltwiseOp):
            pa = params[op.inputs[0]]
            if op.fn == "affine":
                q.weight, q.wscale = _qweight(op.scale.view(-1, 1))
                acc_scale = (torch.tensor(pa.scale, dtype=torch.float32) * q.wscale).float()
                q.bias = torch.clamp(_rint(op.shift / acc_scale.double()), -ACC_LIMIT, ACC_LIMIT).to(torch.int32)
                q.mult = (acc_scale.double() / po.scale).float()
            elif op.fn == "mul":
                pb = params[op.inputs[1]]
                q.mult = torch.tensor([pa.scale * pb.scale / po.scale], dtype=torch.float32)
            elif op.fn == "add":
                pb = params[op.inputs[1]]
                q.mult = torch.tensor([pa.scale / po.scale], dtype=torch.float32)
                q.rmult = torch.tensor([pb.scale / po.scale], dtype=torch.float32)
            else:
                q.lut = _lut(op.fn, pa, po, op.params)
        elif isinstance(op, TorchOp):
            q.fallback = True
        qops.append(q)
    return QGraph(graph, params, qops, method)


# ---- the integer reference -----------------------------------------------------------------------------------------
def _requant(acc: torch.Tensor, mult: torch.Tensor, lo: int, hi: int, channel_dim: int = 1) -> torch.Tensor:
    m = mult.view(*([1] * channel_dim), -1, *([1] * (acc.dim() - channel_dim - 1))) if mult.numel() > 1 else mult
    return torch.clamp(_rint(acc.to(torch.float32) * m), lo, hi).to(torch.int32)


def quantize_input(x: torch.Tensor, p: QParam) -> torch.Tensor:
    x = torch.nan_to_num(x.float(), nan=0.0)
    return torch.clamp(_rint(x / p.scale), p.lo, p.hi).to(torch.int32)


def _int_conv(op: ConvOp | LinearOp, q: QOp, x: torch.Tensor) -> torch.Tensor:
    """Exact integer accumulation, as int64: in float32 when no partial sum can reach 2^24 (every one is then an
    integer float32 holds exactly, in any summation order), else in float64 (exact below 2^53)."""
    dt = torch.float32 if q.exact32 else torch.float64
    if isinstance(op, LinearOp):
        acc = F.linear(x.to(dt), q.weight.to(dt))
    elif isinstance(op, TorchOp):        # a FallbackConv
        c = op.target.conv
        acc = F.conv2d(x.to(dt), q.weight.to(dt), None, c.stride, c.padding, c.dilation, c.groups)
    else:
        acc = F.conv2d(x.to(dt), q.weight.to(dt), None, op.stride, op.padding, 1, op.groups)
    return acc.to(torch.int64)


def run_op_int(qg: QGraph, k: int, env: dict[int, torch.Tensor]) -> torch.Tensor:
    op, q = qg.graph.ops[k], qg.qops[k]
    x = env[op.inputs[0]] if op.inputs else None
    po = qg.params[op.output]
    if q.weight is not None and not isinstance(op, EltwiseOp):      # a conv or linear layer (_conv_parts)
        act = _conv_parts(op)[2]
        acc = _int_conv(op, q, x)
        cshape = (1, -1) + (1,) * (acc.dim() - 2)
        acc = acc + q.bias.to(torch.int64).view(cshape)
        acc = acc.clamp(-ACC_LIMIT - 1, ACC_LIMIT).to(torch.int32)
        y = acc.to(torch.float32) * q.mult.view(cshape)
        if getattr(op, "residual", None) is not None:
            y = y + residual_term(op, env[op.residual], acc.shape[1]).to(torch.float32) * q.rmult
        if q.float_out:
            return ELTWISE_FNS[act](y) if act != "none" else y
        return torch.clamp(_rint(y), q.lo, q.hi).to(torch.int32)
    if isinstance(op, PoolOp):
        if op.mode == "max":
            return F.max_pool2d(x.double(), op.kernel, op.stride, op.padding, ceil_mode=op.ceil_mode).to(torch.int32)
        s = F.avg_pool2d(x.double(), op.kernel, op.stride, op.padding, ceil_mode=op.ceil_mode,
                         count_include_pad=True, divisor_override=1)
        if op.include_pad and not op.ceil_mode:
            n = torch.tensor(float(op.kernel * op.kernel))
        else:
            # PyTorch's divisor per window: the pixels inside the map (count_include_pad=False), or the window
            # clipped to the padded map (ceil_mode's last windows): valid pixels / PyTorch's average of ones
            ones = torch.ones(1, 1, *x.shape[2:], dtype=torch.float64)
            kw = dict(ceil_mode=op.ceil_mode, count_include_pad=True)
            n = F.avg_pool2d(ones, op.kernel, op.stride, op.padding, divisor_override=1, **kw)
            if op.include_pad:
                n = torch.round(n / F.avg_pool2d(ones, op.kernel, op.stride, op.padding, **kw))
        return torch.clamp(_rint(s.to(torch.float32) / n.to(torch.float32)), po.lo, po.hi).to(torch.int32)
    if isinstance(op, GapOp):
        s = x.to(torch.int64).sum((2, 3), keepdim=True)
        return torch.clamp(_rint(s.to(torch.float32) / float(x.shape[2] * x.shape[3])), po.lo, po.hi).to(torch.int32)
    if isinstance(op, FlattenOp):
        return x.flatten(1)
    if isinstance(op, ConcatOp):
        # inputs share the output's scale by construction, except a pool's output (its input's scale): rescaled
        parts = []
        for i in op.inputs:
            pi = qg.params[i]
            parts.append(env[i] if pi == po else torch.clamp(
                _rint(env[i].to(torch.float32) * torch.tensor(pi.scale / po.scale, dtype=torch.float32)),
                po.lo, po.hi).to(torch.int32))
        return torch.cat(parts, 1)
    if isinstance(op, EltwiseOp):
        if op.fn == "affine":
            acc = x * q.weight.view(1, -1, 1, 1) + q.bias.view(1, -1, 1, 1)
            return _requant(acc, q.mult, q.lo, q.hi)
        if op.fn == "mul":
            return _requant(x * env[op.inputs[1]], q.mult, q.lo, q.hi)
        if op.fn == "add":
            y = x.to(torch.float32) * q.mult + env[op.inputs[1]].to(torch.float32) * q.rmult
            return torch.clamp(_rint(y), q.lo, q.hi).to(torch.int32)
        return q.lut[(x - qg.params[op.inputs[0]].lo).long()]
    if isinstance(op, TorchOp):
        fenv = {i: env[i].to(torch.float32) * qg.params[i].scale for i in op.inputs}
        y = run_torch_op(op, fenv)
        return y if op.output in qg.graph.outputs else quantize_input(y, po)
    raise TypeError(f"no integer form of {type(op).__name__}")


def run_int(qg: QGraph, x: torch.Tensor, keep: bool = False):
    """The integer reference: graph outputs as float32 (dequantized, or from the accumulator for a last
    conv/linear layer); with ``keep`` every value's integers by id."""
    g = qg.graph
    env: dict[int, torch.Tensor] = {g.inputs[0]: quantize_input(x, qg.params[g.inputs[0]])}
    with torch.no_grad():
        for k, op in enumerate(g.ops):
            y = run_op_int(qg, k, env)
            env[op.output] = y.reshape(y.shape[0], *g.values[op.output].shape)
    if keep:
        return env
    outs = []
    for o in g.outputs:
        t = env[o]
        outs.append(t if t.dtype == torch.float32 else t.to(torch.float32) * qg.params[o].scale)
    return outs


class QuantizedModel(nn.Module):
    """An int8 network: ``model(x)`` runs the integer reference (float32 in, float32 out), so evaluation,
    accuracy and comparisons use the ordinary tools. ``qgraph`` holds the graph, scales and integer weights."""

    def __init__(self, qgraph: QGraph, input_shape: tuple[int, ...]):
        super().__init__()
        self.qgraph = qgraph
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise SparseforgeError(f"this int8 model was quantized for inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                                   f"got {tuple(x.shape)}; quantize again with an example of the new shape")
        outs = run_int(self.qgraph, x)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @property
    def fallbacks(self) -> list[str]:
        return [op.name for op, q in zip(self.qgraph.graph.ops, self.qgraph.qops) if q.fallback]

    def summary(self) -> str:
        qg = self.qgraph
        lines = [f"int8 model: {len(qg.graph.ops)} ops, calibration {qg.method}"
                 + (f" (scores: {', '.join(f'{k} {v:.4g}' for k, v in qg.scores.items())})" if qg.scores else "")]
        for op, q in zip(qg.graph.ops, qg.qops):
            p = qg.params[op.output]
            kind = "float fallback (dequantize, PyTorch, requantize)" if q.fallback else \
                ("float output" if q.float_out else f"{'int8' if p.signed else 'uint8'} scale {p.scale:.4g}")
            lines.append(f"  {op.name:<28} {op.describe():<52} {kind}")
        return "\n".join(lines)


def _calibration_inputs(calibration: Iterable, max_images: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    out, n = [], 0
    for item in calibration:
        if isinstance(item, (list, tuple)):
            x, y = item[0], (item[1] if len(item) > 1 else None)
        else:
            x, y = item, None
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise SparseforgeError("calibration must yield NCHW input tensors or (input, target) pairs, e.g. a "
                                   "DataLoader over training images")
        take = min(x.shape[0], max_images - n)
        out.append((x[:take].float(), y[:take] if isinstance(y, torch.Tensor) else None))
        n += take
        if n >= max_images:
            break
    if not out:
        raise SparseforgeError("calibration yielded no batches: pass a few hundred representative inputs")
    return out


def _score(qg: QGraph, graph: Graph, batches, float_outs) -> float:
    """Higher is better: calibration-set top-1 accuracy with labels, else minus the output MSE vs float."""
    labelled = all(y is not None for _, y in batches)
    correct = total = 0
    err = 0.0
    for (x, y), ref in zip(batches, float_outs):
        out = run_int(qg, x)[0]
        if labelled:
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
        else:
            err += float(((out - ref) ** 2).mean())
    return correct / max(total, 1) if labelled else -err / len(batches)


def quantize(model: nn.Module, cfg: Int8Config | None = None, calibration: Iterable | None = None) -> QuantizedModel:
    """Post-training int8 of ``model`` (BatchNorm folded, masks kept: a pruned weight stays exactly 0)."""
    cfg = cfg or Int8Config()
    if not isinstance(cfg, Int8Config):
        raise SparseforgeError("quantize takes an Int8Config, e.g. sparseforge.Int8Config(calibration='mse')")
    if calibration is None:
        raise SparseforgeError("quantize needs calibration inputs: calibration=<iterable of input batches or "
                               "(input, target) pairs>, e.g. 1024 training images")
    batches = _calibration_inputs(calibration, cfg.max_images)
    was_training = model.training
    model.eval()
    try:
        # (dilated and non-square convs stay fallbacks: the int8 kernels would run every tap of a square one)
        graph = build_ir(trace(model, batches[0][0][:1]), embed_max_kernels=0.0, channel_ops=False,
                         resize_ops=False)
    finally:
        model.train(was_training)
    stats = _Stats(cfg.samples, cfg.seed)
    float_outs = []
    for x, _ in batches:
        env = run_graph(graph, x, keep=True)
        for vid, t in env.items():
            stats.add(vid, t)
        float_outs.append(env[graph.outputs[0]])
    methods = METHODS if cfg.calibration == "auto" else (cfg.calibration,)
    best: QGraph | None = None
    scores: dict[str, float] = {}
    for m in methods:
        qg = _build_qgraph(graph, stats, m, cfg)
        if len(methods) > 1:
            scores[m] = _score(qg, graph, batches, float_outs)
            if best is None or scores[m] > scores[best.method]:
                best = qg
        else:
            best = qg
    best.scores = scores
    return QuantizedModel(best, tuple(batches[0][0].shape[1:]))
