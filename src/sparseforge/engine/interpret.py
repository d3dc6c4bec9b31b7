"""A PyTorch interpreter of the folded graph: what each IR op means, in a few lines each.

Why: the generated C is checked against the *model*; this interpreter pins the meaning of the IR itself (so
a folding bug and a codegen bug can be told apart), and it is what int8 calibration runs to see every value
the quantized network will hold, exactly as the graph has it (BatchNorm folded, epilogues fused).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .ir import (ConcatOp, ConvOp, EltwiseOp, FlattenOp, GapOp, GatherOp, Graph, LinearOp, Op, PhaseOp, PoolOp,
                 ResizeOp, TorchOp)

ELTWISE_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid, "tanh": torch.tanh, "gelu": F.gelu,
}


def eltwise_fn(fn: str, params: tuple | list = ()) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PyTorch meaning of an element-wise activation, constants included."""
    if fn == "leaky_relu":
        return lambda x: F.leaky_relu(x, float(params[0]))
    if fn == "clamp":
        return lambda x: torch.clamp(x, float(params[0]), float(params[1]))
    return ELTWISE_FNS[fn]


def _sub(a: Any, env: dict[int, torch.Tensor]) -> Any:
    if isinstance(a, tuple) and len(a) == 2 and a[0] == "__value__":
        return env[a[1]]
    if isinstance(a, tuple) and len(a) == 2 and a[0] == "__const__":      # a parameter read in forward
        return a[1]
    if isinstance(a, tuple) and len(a) == 5 and a[0] == "__expr__":       # a size, shape or tuple: evaluated now
        _, call, target, args, kwargs = a
        return _call(call, target, _sub(args, env), _sub(kwargs, env))
    if isinstance(a, (list, tuple)):
        return type(a)(_sub(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _sub(v, env) for k, v in a.items()}
    return a


def _call(call: str, target: Any, args: Any, kwargs: Any) -> Any:
    if call == "method":
        self_ = args[0]
        if target in ("view", "view_as") and isinstance(self_, torch.Tensor) and not self_.is_contiguous():
            # the engine's maps are views of padded buffers, which torch's view cannot reshape; the copy can
            self_ = self_.contiguous()
        return getattr(self_, target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def run_torch_op(op: TorchOp, env: dict[int, torch.Tensor]) -> torch.Tensor:
    """A fallback op on the values in ``env`` (value refs in its args replaced by the tensors)."""
    return _call(op.call, op.target, _sub(op.args, env), _sub(op.kwargs, env))


def activation(act: str, y: torch.Tensor) -> torch.Tensor:
    return y if act == "none" else ELTWISE_FNS[act](y)


def residual_term(op: ConvOp, r: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The value a conv's residual epilogue adds: the value itself, or an option-A shortcut read in place
    (subsampled by ``res_stride``, zero channels before and after)."""
    if op.res_kind != "pad_shortcut":
        return r
    if op.res_stride > 1:
        r = r[:, :, ::op.res_stride, ::op.res_stride]
    after = out_channels - op.res_pad_before - r.shape[1]
    return F.pad(r, (0, 0, 0, 0, op.res_pad_before, after))


def run_op(op: Op, env: dict[int, torch.Tensor], out_shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Op ``op`` on the values in ``env``; ``out_shape`` (per image) is read by the phase split only."""
    x = env[op.inputs[0]] if op.inputs else None
    if isinstance(op, ConvOp):
        if op.embed is not None:
            # the original dilated / non-square kernel, so the pixels under the structural zeros are never read
            e, pd = op.embed, op.padding
            k = op.weight.shape[2]
            ho, wo = ((n + 2 * pd - k) // op.stride + 1 for n in x.shape[2:])
            xp = F.pad(x, (pd, pd, pd, pd))[:, :, e.top:, e.left:]
            y = F.conv2d(xp, e.original(op.weight), op.bias, op.stride, 0, (e.dh, e.dw), op.groups)[:, :, :ho, :wo]
        else:
            y = F.conv2d(x, op.weight, op.bias, op.stride, op.padding, 1, op.groups)
        if op.residual is not None:
            y = y + residual_term(op, env[op.residual], y.shape[1])
        return activation(op.act, y)
    if isinstance(op, LinearOp):
        return activation(op.act, F.linear(x, op.weight, op.bias))
    if isinstance(op, PoolOp):
        if op.mode == "max":
            return F.max_pool2d(x, op.kernel, op.stride, op.padding, ceil_mode=op.ceil_mode)
        return F.avg_pool2d(x, op.kernel, op.stride, op.padding, ceil_mode=op.ceil_mode,
                            count_include_pad=op.include_pad)
    if isinstance(op, GapOp):
        return x.mean((2, 3), keepdim=True)
    if isinstance(op, FlattenOp):
        return x.flatten(1)
    if isinstance(op, ConcatOp):
        return torch.cat([env[i] for i in op.inputs], 1)
    if isinstance(op, GatherOp):
        return x[:, list(op.index)]
    if isinstance(op, ResizeOp):
        ac = op.align_corners if op.mode == "bilinear" else None
        if op.scales is not None:
            return F.interpolate(x, scale_factor=op.scales, mode=op.mode, align_corners=ac,
                                 recompute_scale_factor=False)
        return F.interpolate(x, size=tuple(out_shape[1:]), mode=op.mode, align_corners=ac)
    if isinstance(op, PhaseOp):
        s, p = op.stride, op.padding
        x = F.pad(x, (p, p, p, p))
        n, c, h, w = x.shape
        ho, wo = out_shape[1:]
        x = F.pad(x, (0, wo * s - w, 0, ho * s - h))    # crops or pads with zeros to the value's size
        return x.reshape(n, c, ho, s, wo, s).permute(0, 1, 3, 5, 2, 4).reshape(n, c * s * s, ho, wo)
    if isinstance(op, EltwiseOp):
        if op.fn == "affine":
            return x * op.scale.view(1, -1, 1, 1) + op.shift.view(1, -1, 1, 1)
        if op.fn in ("add", "mul"):
            b = env[op.inputs[1]]
            return x + b if op.fn == "add" else x * b
        return eltwise_fn(op.fn, op.params)(x)
    if isinstance(op, TorchOp):
        return run_torch_op(op, env)
    raise TypeError(f"no interpretation of {type(op).__name__}")


def _shaped(graph: Graph, vid: int, t: torch.Tensor) -> torch.Tensor:
    """Per-image shapes are the graph's: a GAP result flattened away is (C,), one kept for a 1x1 conv (C,1,1)."""
    return t.reshape(t.shape[0], *graph.values[vid].shape)


def run_graph(graph: Graph, x: torch.Tensor, keep: bool = False) -> list[torch.Tensor] | dict[int, torch.Tensor]:
    """The graph's outputs for input ``x`` (or, with ``keep``, every value by id)."""
    env: dict[int, torch.Tensor] = {graph.inputs[0]: x}
    with torch.no_grad():
        for op in graph.ops:
            env[op.output] = _shaped(graph, op.output, run_op(op, env, graph.values[op.output].shape))
    return env if keep else [env[o] for o in graph.outputs]
