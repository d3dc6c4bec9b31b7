"""ONNX QDQ export of an int8 model, so users can take it to onnxruntime or any QDQ-aware runtime.

Every quantized value is ``DequantizeLinear(QuantizeLinear(v))`` with the value's scale and a zero point of 0
(uint8 or int8, as in the integer reference); weights are int8 initializers with per-output-channel scales and
biases int32 initializers at ``s_x * s_w``, both behind ``DequantizeLinear``, so the file holds exactly the
integers ``QuantizedModel`` uses. An element-wise BatchNorm becomes a multiply and add by its quantized
per-channel factors. A runtime computes each op in its own arithmetic between the Q/DQ pairs, so its outputs
agree with the integer reference to within rounding (one quantization step per value where both round a tie
differently), not bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import SparseforgeError
from .ir import ConcatOp, ConvOp, EltwiseOp, FlattenOp, GapOp, LinearOp, PoolOp, TorchOp
from .quant import QuantizedModel
from .trace import FallbackConv


def export_qdq(qmodel: QuantizedModel, path: str | Path | None = None, opset: int = 17,
               debug_outputs: bool = False, feed_values: bool = False) -> bytes:
    """ONNX bytes (and file, when ``path`` is given) of ``qmodel``; batch is dynamic. ``debug_outputs`` adds
    every quantized value's dequantized tensor as an output named ``v<id>`` (to compare value by value).
    ``feed_values`` (checking) gives every op its inputs from graph inputs ``in<id>`` instead of the op before:
    fed the reference's values, each op is then compared on its own, without earlier ops' rounding."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise SparseforgeError(f"ONNX export needs the 'onnx' package ({e}); pip install 'sparseforge[bench]'") from None
    qg = qmodel.qgraph
    g = qg.graph
    nodes, inits = [], []
    counter = [0]

    def const(arr: np.ndarray, name: str | None = None) -> str:
        counter[0] += 1
        name = name or f"c{counter[0]}"
        inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))
        return name

    def node(op_type: str, ins: list[str], out: str | None = None, **attrs) -> str:
        counter[0] += 1
        out = out or f"t{counter[0]}"
        nodes.append(helper.make_node(op_type, ins, [out], name=f"n{counter[0]}", **attrs))
        return out

    def qdq(t: str, vid: int, out: str) -> str:
        p = qg.params[vid]
        s = const(np.array(p.scale, np.float32))
        z = const(np.array(0, np.int8 if p.signed else np.uint8))
        return node("DequantizeLinear", [node("QuantizeLinear", [t, s, z]), s, z], out)

    def weight(q, shape) -> str:
        w = q.weight.numpy().astype(np.int8).reshape(shape)
        s = const(q.wscale.numpy().astype(np.float32))
        z = const(np.zeros(shape[0], np.int8))
        return node("DequantizeLinear", [const(w), s, z], axis=0)

    def bias(q, px_scale: float) -> str:
        acc_scale = (torch.tensor(px_scale, dtype=torch.float32) * q.wscale).numpy().astype(np.float32)
        z = const(np.zeros(acc_scale.shape[0], np.int32))
        return node("DequantizeLinear", [const(q.bias.numpy().astype(np.int32)), const(acc_scale), z], axis=0)

    def act(t: str, a: str, params: tuple = ()) -> str:
        if a == "none":
            return t
        if a == "leaky_relu":
            return node("LeakyRelu", [t], alpha=float(params[0]))
        if a == "clamp":
            return node("Clip", [t, const(np.array(params[0], np.float32)), const(np.array(params[1], np.float32))])
        if a == "relu":
            return node("Relu", [t])
        if a == "relu6":
            return node("Clip", [t, const(np.array(0.0, np.float32)), const(np.array(6.0, np.float32))])
        if a == "sigmoid":
            return node("Sigmoid", [t])
        if a == "hardsigmoid":
            return node("HardSigmoid", [t], alpha=1.0 / 6.0, beta=0.5)
        if a == "hardswish":
            return node("HardSwish", [t])
        if a == "silu":
            return node("Mul", [t, node("Sigmoid", [t])])
        if a == "tanh":
            return node("Tanh", [t])
        if a == "gelu":
            e = node("Erf", [node("Mul", [t, const(np.array(1.0 / math.sqrt(2.0), np.float32))])])
            return node("Mul", [node("Mul", [t, const(np.array(0.5, np.float32))]),
                                node("Add", [e, const(np.array(1.0, np.float32))])])
        raise SparseforgeError(f"no ONNX form of activation {a!r}")

    name = {g.inputs[0]: "v%d" % g.inputs[0]}
    qdq("input", g.inputs[0], name[g.inputs[0]])
    outputs = set(g.outputs)
    fed: dict[int, str] = {}

    def src(vid: int) -> str:
        if not feed_values or vid == g.inputs[0]:
            return name[vid]
        if vid not in fed:
            fed[vid] = qdq(f"in{vid}", vid, f"fed{vid}")
        return fed[vid]

    for op, q in zip(g.ops, qg.qops):
        ins = [src(i) for i in op.inputs]
        v = g.values[op.output]
        out = f"v{op.output}"
        if isinstance(op, TorchOp) and isinstance(op.target, FallbackConv):
            c = op.target.conv
            w = weight(q, tuple(c.weight.shape))
            t = act(node("Conv", [ins[0], w, bias(q, qg.params[op.inputs[0]].scale)],
                         kernel_shape=list(c.kernel_size), strides=list(c.stride), pads=list(c.padding) * 2,
                         dilations=list(c.dilation), group=c.groups), op.target.act)
        elif isinstance(op, TorchOp):
            raise SparseforgeError(f"op {op.name!r} runs in PyTorch ({op.reason}); it has no ONNX QDQ form: "
                                   "export the float model with export_onnx instead")
        elif isinstance(op, ConvOp):
            w = weight(q, tuple(op.weight.shape))
            t = node("Conv", [ins[0], w, bias(q, qg.params[op.inputs[0]].scale)],
                     kernel_shape=list(op.weight.shape[2:]), strides=[op.stride] * 2, pads=[op.padding] * 4,
                     group=op.groups)
            if op.residual is not None:
                r = src(op.residual)
                if op.res_kind == "pad_shortcut":
                    if op.res_stride > 1:
                        r = node("Slice", [r, const(np.array([0, 0], np.int64)),
                                           const(np.array([2 ** 62, 2 ** 62], np.int64)),
                                           const(np.array([2, 3], np.int64)),
                                           const(np.array([op.res_stride] * 2, np.int64))])
                    after = v.shape[0] - op.res_pad_before - g.values[op.residual].shape[0]
                    r = node("Pad", [r, const(np.array([0, op.res_pad_before, 0, 0, 0, after, 0, 0], np.int64))])
                t = node("Add", [t, r])
            t = act(t, op.act)
        elif isinstance(op, LinearOp):
            w = weight(q, tuple(op.weight.shape))
            t = act(node("Gemm", [ins[0], w, bias(q, qg.params[op.inputs[0]].scale)], transB=1), op.act)
        elif isinstance(op, PoolOp):
            kw = dict(kernel_shape=[op.kernel] * 2, strides=[op.stride] * 2, pads=[op.padding] * 4,
                      ceil_mode=int(op.ceil_mode))
            if op.mode == "max":
                t = node("MaxPool", ins[:1], **kw)
            else:
                t = node("AveragePool", ins[:1], count_include_pad=int(op.include_pad), **kw)
        elif isinstance(op, GapOp):
            t = node("GlobalAveragePool", ins[:1])
            if len(v.shape) == 1:
                t = node("Flatten", [t], axis=1)
        elif isinstance(op, FlattenOp):
            t = node("Flatten", ins[:1], axis=1)
        elif isinstance(op, ConcatOp):
            t = node("Concat", ins, axis=1)
        elif isinstance(op, EltwiseOp):
            if op.fn == "affine":
                acc_scale = float(qg.params[op.inputs[0]].scale) * q.wscale
                a = (q.weight.view(-1).float() * q.wscale).numpy().astype(np.float32).reshape(1, -1, 1, 1)
                b = (q.bias.double() * acc_scale.double()).numpy().astype(np.float32).reshape(1, -1, 1, 1)
                t = node("Add", [node("Mul", [ins[0], const(a)]), const(b)])
            elif op.fn in ("add", "mul"):
                t = node("Add" if op.fn == "add" else "Mul", ins[:2])
            else:
                t = act(ins[0], op.fn, op.params)
        else:
            raise SparseforgeError(f"no ONNX QDQ form of {type(op).__name__} ({op.name!r})")
        if op.output in outputs and q.float_out:
            name[op.output] = node("Identity", [t], out)
        else:
            name[op.output] = qdq(t, op.output, out)
    def info(vid: int):
        return helper.make_tensor_value_info(name[vid], TensorProto.FLOAT, ["batch", *g.values[vid].shape])

    graph_outputs = [info(o) for o in g.outputs]
    if debug_outputs:
        graph_outputs += [info(vid) for vid in g.values if vid in name and vid not in outputs]
    inp = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *qmodel.input_shape])]
    inp += [helper.make_tensor_value_info(f"in{vid}", TensorProto.FLOAT, ["batch", *g.values[vid].shape])
            for vid in fed]
    model = helper.make_model(helper.make_graph(nodes, "sparseforge_int8", inp, graph_outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)], producer_name="sparseforge")
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    if path is not None:
        from ..utils import atomic_write_bytes

        atomic_write_bytes(Path(path), data)
    return data
