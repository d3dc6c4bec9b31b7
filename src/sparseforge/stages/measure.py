"""Measuring stages: compile with the engine and time it against the dense runtimes; robustness estimate."""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any

import torch

from ..config import Config, opt
from ..errors import ConfigError
from .base import StageMethod, register_stage


@dataclasses.dataclass(frozen=True)
class CompileConfig(Config):
    """Compile the current model with sparseforge.compile and measure it against the dense start model."""

    threads: int = opt(0, "engine and baseline threads (0 = the training threads / PyTorch default)", min=0)
    batches: tuple[int, ...] = opt((1,), "batch sizes measured", min=1)
    runs: int = opt(30, "timed runs per arm and batch size (median, p10, p90 reported)", min=5)
    onnxruntime: bool = opt(True, "also time onnxruntime on the dense ONNX, when installed")

    def validate(self) -> None:
        if not self.batches:
            raise ConfigError("CompileConfig.batches is empty: list the batch sizes to measure, e.g. batches = [1]")


@register_stage("compile", CompileConfig, main_rank_only=True)
class Compile(StageMethod):
    """Engine vs PyTorch dense (BN folded) vs onnxruntime dense vs PyTorch on the compressed model."""

    def run(self, ctx, model):
        from ..engine import compile as sf_compile
        from ..report.latency import measure, onnxruntime_session, torch_fused

        c = ctx.config
        threads = c.threads or ctx.train_config().threads or torch.get_num_threads()
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model.eval()
            x1 = ctx.example()
            engine = sf_compile(model, x1, threads=threads)
            dense = torch_fused(ctx.start_model)
            mine = torch_fused(model)
            sess = onnxruntime_session(ctx.start_model, x1, threads) if c.onnxruntime else None
            out: dict[str, Any] = {"threads": threads, "latency": {}}
            for b in c.batches:
                x = x1.repeat(b, 1, 1, 1)
                with torch.inference_mode():
                    ref = model(x)
                    out.setdefault("max_rel_err", {})[str(b)] = float((engine(x) - ref).abs().max() / ref.abs().max())
                fns = {"sparseforge": lambda x=x: engine(x), "torch-dense": lambda x=x: dense(x),
                       "torch-compressed": lambda x=x: mine(x)}
                if sess is not None:
                    xn = x.numpy()
                    fns["onnxruntime-dense"] = lambda xn=xn: sess.run(None, {"input": xn})
                out["latency"][str(b)] = measure(fns, runs=c.runs)
            prof = engine.profile(batch=1, reps=20, mode="network")
            out["engine_ops"] = [{"name": op["name"], "path": "generated" if op["native"] else "PyTorch",
                                  "describe": op["describe"], "us": 1e6 * prof.get(k, 0.0)}
                                 for k, op in enumerate(engine.spec["ops"])]
            if (ctx.dir / "engine").exists():
                # left by an earlier attempt at this stage that was killed before the stage was marked done (a
                # done stage is never rerun): this attempt's engine replaces it, so results.json names it
                shutil.rmtree(ctx.dir / "engine")
            try:
                engine.save(ctx.dir / "engine")
                out["engine_dir"] = str(ctx.dir / "engine")
            except Exception as e:  # noqa: BLE001 - engines with PyTorch fallbacks cannot be saved yet
                out["engine_dir"] = None
                out["engine_save_error"] = str(e)
            return model, out
        finally:
            torch.set_num_threads(prev)


@dataclasses.dataclass(frozen=True)
class RobustnessConfig(Config):
    """Localized Lipschitz estimate of the current model and of the dense start model, side by side."""

    eps: tuple[float, ...] = opt((0.01, 0.03, 0.1, 0.3, 1.0), "perturbation norms (L2, input space)")
    samples: int = opt(256, "test images", min=1)
    perturbations: int = opt(8, "random directions per image and eps", min=1)


@register_stage("robustness", RobustnessConfig)
class Robustness(StageMethod):
    def run(self, ctx, model):
        from ..report import lipschitz

        c = ctx.config
        el = ctx.loaders()[1]
        kw = dict(eps_values=c.eps, perturbations=c.perturbations, max_samples=c.samples)
        return model, {"lipschitz": {
            "dense start": {str(k): v for k, v in lipschitz(ctx.start_model, el.iterate(0, 0), **kw).items()},
            "compressed": {str(k): v for k, v in lipschitz(model, el.iterate(0, 0), **kw).items()}}}
