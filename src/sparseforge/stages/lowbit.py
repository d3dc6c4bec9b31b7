"""Low-bit stages: power-of-two weights and progressive precision, folded to plain float weights at the end."""

from __future__ import annotations

import dataclasses

from ..config import opt
from ..engine.quant import Int8Config
from ..lowbit import (Pow2Config, ProgressivePrecisionCallback, ProgressivePrecisionConfig, apply_fake_quant,
                      apply_pow2, fold_lowbit, pow2_storage)
from ..structured import count_macs
from .base import StageMethod, register_stage


@register_stage("pow2", Pow2Config)
class Pow2(StageMethod):
    def run(self, ctx, model):
        apply_pow2(model, ctx.config)
        info = {"storage_bits_before": pow2_storage(model)}
        info["train"] = ctx.train(model, ctx.config.epochs)
        info["storage_bits"] = pow2_storage(model)
        fold_lowbit(model)
        return model, info


@register_stage("precision", ProgressivePrecisionConfig)
class ProgressivePrecision(StageMethod):
    def run(self, ctx, model):
        macs = count_macs(model, ctx.example())
        apply_fake_quant(model)
        cb = ProgressivePrecisionCallback(ctx.config, macs)
        info = {"train": ctx.train(model, ctx.config.epochs, [cb])}
        info["precision"] = {"final_stage": cb.stage, "switch_steps": cb.switches, "bitops": cb.bitops,
                             "bitops_fixed_8bit": cb.bitops_8bit, "saved": cb.saved()}
        fold_lowbit(model)
        return model, info


@dataclasses.dataclass(frozen=True)
class Int8StageConfig(Int8Config):
    """Post-training int8 of the current model: test accuracy before and after (the integer reference), the
    QDQ ONNX in the stage directory, and batch-1 latency of the int8 engine (``Int8Engine``, bit-exact with the
    reference) next to onnxruntime fp32 and the QDQ export in onnxruntime. The recipe's model stays float: later
    stages (fine-tuning, compile) take the float weights."""

    export: bool = opt(True, "write model-int8.onnx (QDQ, the same integers as the reference) into the stage directory")
    runs: int = opt(20, "timed runs per arm (int8 engine, onnxruntime fp32 and the int8 export), batch 1 "
                        "(0 = no timing)", min=0)
    threads: int = opt(0, "inference threads (0 = the training threads / PyTorch default)", min=0)


@register_stage("int8", Int8StageConfig, main_rank_only=True)
class Int8(StageMethod):
    def run(self, ctx, model):
        import torch

        from ..engine import Int8Config as _Int8Config
        from ..engine import export_qdq, quantize

        c = ctx.config
        model.eval()
        per_batch = ctx.train_config().batch_size
        calib = ctx.calibration(max(1, -(-c.max_images // per_batch)))
        qcfg = _Int8Config(**{f: getattr(c, f) for f in _Int8Config.field_names()})
        qm = quantize(model, qcfg, calib)
        info = {"int8": {"calibration": qm.qgraph.method, "scores": qm.qgraph.scores, "fallbacks": qm.fallbacks,
                         "calibration_images": sum(int(x.shape[0]) for x, _ in calib)}}
        info["int8"]["acc_fp32"] = ctx.evaluate(model)["acc"]
        info["int8"]["acc_int8"] = ctx.evaluate(qm)["acc"]
        info["int8"]["delta_pt"] = info["int8"]["acc_int8"] - info["int8"]["acc_fp32"]
        ctx.log(f"int8 ({qm.qgraph.method}): {info['int8']['acc_int8']:.2f}% vs fp32 {info['int8']['acc_fp32']:.2f}%")
        path = None
        if c.export and not qm.fallbacks:
            path = ctx.dir / "model-int8.onnx"
            export_qdq(qm, path)
            info["int8"]["onnx"] = path.name
        if c.runs:
            info["int8"]["latency"] = _latency(model, qm, path, ctx.example(),
                                               c.threads or ctx.train_config().threads or torch.get_num_threads(),
                                               c.runs)
        return model, info


def _latency(model, qm, int8_path, x, threads: int, runs: int) -> dict:
    """Batch 1, arms alternating: the int8 engine, and where onnxruntime is installed onnxruntime fp32 (the
    float model's ONNX) and the int8 QDQ export."""
    from ..engine.int8 import Int8Engine
    from ..report.latency import measure, onnxruntime_session

    engine = Int8Engine(qm, threads=threads)
    arms = {"sparseforge-int8": lambda: engine(x)}
    fp32 = onnxruntime_session(model, x, threads)
    if fp32 is not None:
        import onnxruntime as ort

        xn = x.numpy()
        arms["onnxruntime-fp32"] = lambda: fp32.run(None, {"input": xn})
        if int8_path is not None:
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            int8 = ort.InferenceSession(str(int8_path), so, providers=["CPUExecutionProvider"])
            arms["onnxruntime-int8 (sparseforge QDQ)"] = lambda: int8.run(None, {"input": xn})
    return {"threads": threads, "batch": 1, "arms": measure(arms, runs=runs),
            "engine": engine.summary().splitlines()[0]}
