"""One small training loop, extended by callbacks.

Methods (ADMM penalties, masks, distillation, early-bird, ...) plug in as
callbacks or a loss module instead of forking the loop. The loop owns only:
batches, the optimiser step, the stateless LR schedule, evaluation, metrics
and checkpoints -- and so exact resume for everything built on it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import BatchLoader
from ..errors import CheckpointError, RunDirError, TrainingDivergedError
from ..masks import ensure_sparsity_buffers
from ..utils import model_device
from .callbacks import Callback, MaskCallback
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .schedule import lr_factor
from .. import rundir


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on BN/bias (1-D) parameters: standard for CIFAR ResNets and harmless elsewhere.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader, max_batches: int = 0) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over ``loader``, on whatever device the model is."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    correct, total, loss_sum = 0, 0, 0.0
    for i, (x, y) in enumerate(loader.iterate(0)):
        if max_batches and i >= max_batches:
            break
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    return {"acc": 100.0 * correct / max(1, total), "loss": loss_sum / max(1, total), "n": total}


# config fields a resumed run may change (where it runs, how often it evaluates and checkpoints, where the data is)
RESUME_MAY_CHANGE = frozenset({"device", "threads", "eval_every", "checkpoint_every", "keep_checkpoints", "data_dir",
                               "compile"})


class Trainer:
    """Train ``model`` with ``config``; checkpoints and metrics go to ``run_dir`` when given."""

    def __init__(self, model: nn.Module, config: TrainConfig, train_loader: BatchLoader,
                 test_loader: BatchLoader | None = None, callbacks: Iterable[Callback] = (),
                 run_dir: str | Path | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
                 progress: bool | None = None, optimizer: torch.optim.Optimizer | None = None,
                 log: Callable[[str], None] | None = None, is_main: bool = True):
        from ..utils import resolve_device

        self.config = config
        # the loop runs on config.device; the model goes back to where it came from when fit ends (pruning, surgery
        # and the compiler that follow work on CPU tensors)
        self.device = resolve_device(config.device)
        self.home_device = model_device(model)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.test_loader = test_loader
        # Masked training is always on: pruned weights stay exactly zero whatever the other callbacks do.
        self.callbacks = [cb for cb in callbacks if not isinstance(cb, MaskCallback)] + [MaskCallback()]
        self.run_dir = Path(run_dir) if run_dir else None
        self.loss_fn = loss_fn or nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.progress = progress
        self.optimizer = optimizer or build_optimizer(model, config)
        for g in self.optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
        self.log = log or (lambda s: print(s, file=sys.stderr))
        from ..distributed import rank_world, wrap

        self.rank, self.world_size = rank_world()
        self.is_main = is_main and self.rank == 0    # only rank 0 logs and writes checkpoints
        self.epoch = 0            # current epoch (0-based)
        self.batch_in_epoch = 0   # batches of the current epoch already done
        self.step = 0             # global optimizer steps done
        self.history: list[dict[str, Any]] = []
        self.should_stop = False  # a callback may end training early (e.g. an early-bird ticket was drawn)
        if config.sync_bn and self.world_size > 1:
            from ..distributed import convert_sync_bn

            convert_sync_bn(model)                   # in place: the same parameters, the optimizer is unaffected
        self._forward = wrap(model, self.device)     # DDP under torchrun: gradients averaged over ranks
        if config.precision == "bf16" and self.is_main and self.device.type == "cpu":
            from ..hardware import cpu_flags

            if not {"amx_bf16", "avx512_bf16"} & set(cpu_flags()):
                self.log("warning: TrainConfig.precision='bf16' on a CPU without AMX or AVX512-BF16: bfloat16 "
                         "arithmetic is emulated there and runs slower than fp32; use precision='fp32'")
        if config.compile:
            try:
                # static shapes: the epoch's last, smaller batch gets a graph of its own. With torch's automatic
                # dynamic shapes it would switch every later step to a shape-generic graph, measured slower
                # (depth-pruned ResNet-56, batch 128, bf16, 2 threads: 109 vs 95 ms a step)
                self._forward = torch.compile(self._forward, dynamic=False)
            except Exception as e:  # pragma: no cover - depends on the toolchain
                self.log(f"warning: torch.compile unavailable ({e}); training eagerly")

    # ---- schedule -----------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        n = self.train_loader.num_batches()
        return min(n, self.config.max_steps_per_epoch) if self.config.max_steps_per_epoch else n

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    def current_lr_factor(self) -> float:
        c = self.config
        return lr_factor(c.schedule, self.step, self.total_steps,
                         warmup_steps=int(c.warmup_epochs * self.steps_per_epoch),
                         milestones=c.milestones, gamma=c.gamma)

    def _set_lr(self) -> float:
        f = self.current_lr_factor()
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    # ---- checkpoints --------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / rundir.CHECKPOINTS if self.run_dir else None

    def save(self) -> None:
        from ..distributed import barrier

        if not self.checkpoint_dir or not self.is_main:
            barrier()
            return
        from ..models import model_spec

        extra = {"optimizer": self.optimizer.state_dict(),
                 "callbacks": {f"{i}:{cb.name}": cb.state_dict() for i, cb in enumerate(self.callbacks)}}
        meta = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "rng": rng_state(cuda=self.device.type == "cuda"), "config": self.config.to_dict(), "history": self.history}
        save_checkpoint(self.checkpoint_dir, f"step-{self.step:09d}", self.model.state_dict(), extra, meta,
                        model_spec=model_spec(self.model), keep=self.config.keep_checkpoints)
        barrier()       # other ranks may resume from it: it must be complete before anyone goes on

    def resume(self) -> bool:
        """Restore the last checkpoint of ``run_dir``; False when there is none."""
        ref = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        if ref is None:
            return False
        model_state, extra, meta = load_checkpoint(ref)
        saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        now = self.config.to_dict()
        changed = sorted(k for k in saved.keys() & now.keys() if k not in RESUME_MAY_CHANGE and saved[k] != now[k])
        if changed:
            # the optimizer state and schedule come from the checkpoint: an edited lr etc. would be ignored
            raise RunDirError(f"{self.run_dir}: the run's config differs from the one its checkpoint was trained with "
                              f"({', '.join(f'{k}: {saved[k]!r} -> {now[k]!r}' for k in changed[:4])}); a resume "
                              "continues the run as it started: undo the edit, or start a new run directory")
        try:
            ensure_sparsity_buffers(self.model, model_state)
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(extra["optimizer"])
            for i, cb in enumerate(self.callbacks):
                cb.load_state_dict(extra["callbacks"].get(f"{i}:{cb.name}", {}))
            self.epoch, self.batch_in_epoch, self.step = int(meta["epoch"]), int(meta["batch_in_epoch"]), int(meta["step"])
            self.history = meta.get("history", [])
            set_rng_state(meta["rng"])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
            # another architecture's weights (or a hand-made record) under valid hashes
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {ref.tag} in {self.checkpoint_dir} does not fit this run's model "
                                  f"{self.config.model!r} ({first}); it is another run's: start a new run "
                                  "directory") from None
        self._truncate_metrics()
        self.log(f"resumed from {ref.tag} (epoch {self.epoch + 1}, batch {self.batch_in_epoch}, step {self.step})")
        return True

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resumed from, so nothing is counted twice."""
        if not self.run_dir or not self.is_main:
            return
        p = self.run_dir / rundir.METRICS
        if not p.exists():
            return
        keep = []
        for line in p.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except ValueError:
                continue  # a line torn by the kill
        from ..utils import atomic_write_text

        atomic_write_text(p, "".join(s + "\n" for s in keep))

    def _log_metrics(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.run_dir and self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / rundir.METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- loop ---------------------------------------------------------
    def autocast(self):
        """The forward's arithmetic (``TrainConfig.precision``): callbacks that run a model of their own (a teacher,
        a second R-Drop pass) run it inside this too, so it costs what the student's forward costs."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def full_precision(self):
        """A region in fp32 inside :meth:`autocast` (losses between nearly equal feature maps or distributions)."""
        return torch.autocast(self.device.type, enabled=False)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for cb in self.callbacks:
            x, y = cb.on_batch(self, x, y)
        with self.autocast():
            # losses see fp32 logits: a bf16 softmax keeps ~3 significant digits, too few for a KL between
            # nearly equal distributions
            logits = self._forward(x).float()
            loss = self.loss_fn(logits, y)
            for cb in self.callbacks:
                loss = cb.on_loss(self, loss, logits, x, y)
        return loss, logits

    def fit(self, resume: bool = False) -> dict[str, Any]:
        self.model.to(self.device)
        try:
            return self._fit(resume)
        finally:
            self.model.to(self.home_device)

    def _fit(self, resume: bool) -> dict[str, Any]:
        from tqdm import tqdm

        c = self.config
        if len(self.train_loader) == 0:
            from ..errors import ConfigError

            n = len(getattr(self.train_loader, "dataset", ()) or ())
            raise ConfigError(f"TrainConfig.batch_size: {c.batch_size} is larger than the training set ({n} images, "
                              "full batches only), so an epoch would run no step; lower batch_size")
        if self.run_dir and not resume and latest_checkpoint(self.run_dir / rundir.CHECKPOINTS) is not None:
            raise RunDirError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
        if resume:
            self.resume()
        if getattr(self, "announce", False) and self.run_dir and self.is_main:
            self.log(f"run directory: {self.run_dir}")
        for cb in self.callbacks:
            cb.on_train_begin(self)
        self.model.train()
        while self.epoch < c.epochs:
            epoch = self.epoch
            for cb in self.callbacks:
                cb.on_epoch_begin(self, epoch)
            n = self.steps_per_epoch
            seen, correct, loss_sum, t0 = 0, 0, 0.0, time.perf_counter()
            bar = tqdm(total=n, initial=self.batch_in_epoch, desc=f"epoch {epoch + 1}/{c.epochs}",
                       disable=(not self.is_main) or (self.progress is False) or (self.progress is None and not sys.stderr.isatty()),
                       leave=False, dynamic_ncols=True)
            for x, y in self.train_loader.iterate(epoch, self.batch_in_epoch):
                if self.batch_in_epoch >= n:
                    break
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                lr = self._set_lr()
                loss, logits = self.compute_loss(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for cb in self.callbacks:
                    cb.on_after_backward(self)
                self.optimizer.step()
                self.step += 1
                self.batch_in_epoch += 1
                for cb in self.callbacks:
                    cb.on_step_end(self)
                lv = loss.item()
                if not math.isfinite(lv):
                    if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                        why = "the weights hold NaN/Inf"
                    else:
                        why = "the weights are finite, so an input or the loss itself is not"
                    raise TrainingDivergedError(f"training diverged: loss {lv} at step {self.step} (epoch "
                                                f"{self.epoch + 1}; {why}); lower the learning rate, or check "
                                                "the data and the loss")
                seen += y.numel()
                loss_sum += lv * y.numel()
                correct += (logits.detach().argmax(1) == (y if y.dim() == 1 else y.argmax(1))).sum().item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}", lr=f"{lr:.3g}")
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.batch_in_epoch < n:
                    self.save()
            bar.close()
            dt = time.perf_counter() - t0
            record: dict[str, Any] = {"split": "train", "epoch": epoch + 1, "step": self.step,
                                      "lr": self.optimizer.param_groups[0]["lr"], "time_s": round(dt, 3)}
            if seen:  # a resume exactly at an epoch end has nothing new to report
                record.update(loss=loss_sum / seen, acc=100 * correct / seen, images_per_s=seen / max(dt, 1e-9))
            metrics = dict(record)
            if self.test_loader is not None and (
                    (c.eval_every and (epoch + 1) % c.eval_every == 0) or epoch + 1 == c.epochs):
                ev = evaluate(self.model, self.test_loader)
                metrics.update(test_acc=ev["acc"], test_loss=ev["loss"])
                record.update(test_acc=ev["acc"], test_loss=ev["loss"])
            self._log_metrics(record)
            msg = f"epoch {epoch + 1}/{c.epochs}"
            if "loss" in record:
                msg += f"  loss {record['loss']:.4f}  train acc {record['acc']:.2f}%"
            if "test_acc" in record:
                msg += f"  test acc {record['test_acc']:.2f}%"
            if "images_per_s" in record:
                msg += f"  ({record['images_per_s']:.0f} img/s)"
            if self.is_main:
                self.log(msg)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, metrics)
            self.epoch += 1
            self.batch_in_epoch = 0
            self.save()
            if self.should_stop:
                break
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.model.eval()
        return self.history[-1] if self.history else {}
