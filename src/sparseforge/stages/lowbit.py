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
    QDQ ONNX in the stage directory and its onnxruntime latency next to fp32. The recipe's model stays float:
    later stages (fine-tuning, compile) take the float weights; the engine has no int8 kernels yet."""

    export: bool = opt(True, "write model-int8.onnx (QDQ, the same integers as the reference) into the stage directory")
    runs: int = opt(20, "timed onnxruntime runs per arm, fp32 vs the int8 export, batch 1 (0 = no timing)", min=0)
    threads: int = opt(0, "onnxruntime threads (0 = the training threads / PyTorch default)", min=0)


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
        if c.export and not qm.fallbacks:
            path = ctx.dir / "model-int8.onnx"
            export_qdq(qm, path)
            info["int8"]["onnx"] = path.name
            if c.runs:
                info["int8"]["latency"] = _ort_latency(model, path, ctx.example(),
                                                       c.threads or ctx.train_config().threads or torch.get_num_threads(),
                                                       c.runs)
        return model, info


def _ort_latency(model, int8_path, x, threads: int, runs: int) -> dict | None:
    """onnxruntime fp32 (the float model's ONNX) vs the int8 QDQ export, batch 1, arms alternating."""
    from ..report.latency import measure, onnxruntime_session

    fp32 = onnxruntime_session(model, x, threads)
    if fp32 is None:
        return None
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    int8 = ort.InferenceSession(str(int8_path), so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    res = measure({"onnxruntime-fp32": lambda: fp32.run(None, {"input": xn}),
                   "onnxruntime-int8 (sparseforge QDQ)": lambda: int8.run(None, {"input": xn})}, runs=runs)
    return {"threads": threads, "batch": 1, "arms": res}
