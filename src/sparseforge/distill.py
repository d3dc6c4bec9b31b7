"""Distillation losses (Hinton KD, RKD distance/angle, graph KD) and feature taps.

Reductions are fixed and documented: cross-entropy is the batch mean and every KL term uses
``batchmean`` (the per-sample sum over classes averaged over the batch) -- the reference CIFAR KD code
also divides by the class count, which makes KD ten times weaker on CIFAR-10.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import SparseforgeError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 5.0, alpha: float = 0.9,
            targets: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, targets)."""
    if student_logits.shape != teacher_logits.shape:
        raise SparseforgeError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                               f"{tuple(teacher_logits.shape)} differ; distil between models with the same classes")
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits.detach() / T, dim=1),
                  reduction="batchmean", log_target=True)
    loss = alpha * T * T * kl
    if alpha < 1:
        if targets is None:
            raise SparseforgeError("kd_loss with alpha < 1 needs targets for its cross-entropy term")
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, targets)
    return loss


def _pdist(e: torch.Tensor) -> torch.Tensor:
    sq = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1)
    return sq.clamp_min(1e-12).sqrt() * (1 - torch.eye(len(e), dtype=e.dtype, device=e.device))


def rkd_distance_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Huber loss between pairwise distances, each set normalised by its mean off-diagonal distance."""
    s, t = s.flatten(1), t.flatten(1).detach()
    n = len(s)
    if n < 2:
        raise SparseforgeError("rkd_distance_loss needs a batch of at least 2 embeddings")
    off = n * (n - 1)
    ds, dt = _pdist(s), _pdist(t)
    ds = ds / (ds.sum() / off).clamp_min(1e-12)
    dt = dt / (dt.sum() / off).clamp_min(1e-12)
    return F.smooth_l1_loss(ds, dt, reduction="mean")


def _angles(e: torch.Tensor) -> torch.Tensor:
    d = e.unsqueeze(0) - e.unsqueeze(1)            # d[i, j] = e_j - e_i
    d = F.normalize(d, p=2, dim=2)
    return torch.bmm(d, d.transpose(1, 2))          # [i, j, k] = cos of the angle at e_i between e_j and e_k


def rkd_angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Huber loss between the cosines of all triplet angles (O(N^3) memory: keep batches <= ~128)."""
    s, t = s.flatten(1), t.flatten(1).detach()
    if len(s) < 3:
        raise SparseforgeError("rkd_angle_loss needs a batch of at least 3 embeddings")
    return F.smooth_l1_loss(_angles(s), _angles(t), reduction="mean")


def _graph(f: torch.Tensor) -> torch.Tensor:
    """Cosine adjacency with zero diagonal, symmetrically normalised; degrees <= 0 contribute nothing."""
    f = F.normalize(f.flatten(1), p=2, dim=1)
    a = f @ f.t()
    a = a * (1 - torch.eye(len(a), dtype=a.dtype, device=a.device))
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
    return inv[:, None] * a * inv[None, :]


def hint_loss(s_feats, t_feats) -> torch.Tensor:
    """Sum over tapped layers of ||s - t||^2 / ||t||^2 (FitNets hints without a regressor: the student's
    features must have the teacher's shapes, as after depth pruning, which keeps every width)."""
    if isinstance(s_feats, torch.Tensor):
        s_feats, t_feats = [s_feats], [t_feats]
    if len(s_feats) != len(t_feats) or not s_feats:
        raise SparseforgeError(f"hint_loss: {len(s_feats)} student vs {len(t_feats)} teacher feature maps; "
                               "tap the same number of layers in both")
    total = 0.0
    for k, (s, t) in enumerate(zip(s_feats, t_feats)):
        if s.shape != t.shape:
            raise SparseforgeError(f"hint_loss: tap {k} has shape {tuple(s.shape)} in the student and "
                                   f"{tuple(t.shape)} in the teacher; hints need equal shapes (tap layers whose "
                                   "width pruning kept, or use graph KD, which works across widths)")
        t = t.detach()
        total = total + ((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)
    return total


def graph_kd_loss(s_feats, t_feats, weight: float = 1.0) -> torch.Tensor:
    """weight * sum over tapped layers of ||A_T - A_S||_F^2 (works across different widths)."""
    if isinstance(s_feats, torch.Tensor):
        s_feats, t_feats = [s_feats], [t_feats]
    if len(s_feats) != len(t_feats) or not s_feats:
        raise SparseforgeError(f"graph_kd_loss: {len(s_feats)} student vs {len(t_feats)} teacher feature maps; "
                               "tap the same number of layers in both")
    return weight * sum(((_graph(t.detach()) - _graph(s)) ** 2).sum() for s, t in zip(s_feats, t_feats))


@contextmanager
def feature_taps(model: nn.Module, paths: list[str] | tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the outputs of the modules at ``paths`` during forwards inside the block; hooks are removed on
    exit (so the model deep-copies and pickles as before)."""
    mods = dict(model.named_modules())
    missing = [p for p in paths if p not in mods]
    if missing:
        near = [n for n in mods if n and n.split(".")[-1] in {m.split(".")[-1] for m in missing}][:5]
        raise SparseforgeError(f"feature_taps: no module named {missing}; e.g. {near or list(mods)[1:6]}")
    feats: dict[str, torch.Tensor] = {}
    hooks = [mods[p].register_forward_hook(lambda m, i, o, p=p: feats.__setitem__(p, o)) for p in paths]
    try:
        yield feats
    finally:
        for h in hooks:
            h.remove()


class Teacher:
    """A frozen teacher: eval mode, outputs computed without grad (optionally with feature taps)."""

    def __init__(self, model: nn.Module, taps: tuple[str, ...] = ()):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.taps = tuple(taps)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with feature_taps(self.model, self.taps) as f:
            logits = self.model(x)
        return logits, [f[p] for p in self.taps]


__all__ = ["kd_loss", "rkd_distance_loss", "rkd_angle_loss", "graph_kd_loss", "hint_loss", "feature_taps", "Teacher"]


# ---- training integration -------------------------------------------------------------------------------
import dataclasses  # noqa: E402

from .config import Config, opt  # noqa: E402
from .train.loop import Callback  # noqa: E402


@dataclasses.dataclass(frozen=True)
class KDConfig(Config):
    """Train with a teacher: Hinton KD on the logits, optionally RKD on embeddings and graph KD on taps."""

    epochs: int = opt(3, "recipe stage: epochs of distillation", min=1)
    teacher: str = opt("start", "'start' (the recipe's model before any stage), 'stage:N' (the model "
                                "stage N of this recipe produced, e.g. the dense model before pruning), or a "
                                "weights file / run directory")
    T: float = opt(5.0, "temperature", min=1e-3)
    alpha: float = opt(0.9, "weight of the KD term (1 - alpha on cross-entropy)", min=0.0, max=1.0)
    rkd_distance: float = opt(0.0, "weight of the RKD distance term on the penultimate features", min=0.0)
    rkd_angle: float = opt(0.0, "weight of the RKD angle term on the penultimate features", min=0.0)
    graph: float = opt(0.0, "weight of graph KD over `taps`", min=0.0)
    hint: float = opt(0.0, "weight of feature matching over `taps` (FitNets hints): relative squared error "
                           "||s - t||^2 / ||t||^2 per tap; needs the same shapes (e.g. a depth-pruned student)",
                      min=0.0)
    taps: tuple[str, ...] = opt((), "module paths tapped for graph KD (same paths in teacher and student)")
    embed: str = opt("", "module whose output is the embedding for RKD (default: the input of the classifier)")
    online: bool = opt(False, "the teacher keeps training on the labels during the stage (same optimizer settings "
                              "and schedule as the student, same batches), and the student distils from it as it "
                              "improves: with teacher = 'start' the teacher is the dense control, trained alongside; "
                              "a step costs a teacher training step more")


def _embed_module(model: nn.Module, cfg: KDConfig) -> str:
    if cfg.embed:
        return cfg.embed
    lins = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not lins:
        raise SparseforgeError("RKD needs an embedding: set KDConfig.embed to a module path")
    return lins[-1]


class _Hooks:
    """Forward hooks recording module outputs (taps) and one module's input (the embedding)."""

    def __init__(self, model: nn.Module, taps: tuple[str, ...], embed: str | None):
        mods = dict(model.named_modules())
        for p in [*taps, *([embed] if embed else [])]:
            if p not in mods:
                raise SparseforgeError(f"distillation: no module named {p!r} in {type(model).__name__}")
        self.out: dict[str, torch.Tensor] = {}
        self.emb: torch.Tensor | None = None
        self.handles = [mods[p].register_forward_hook(lambda m, i, o, p=p: self.out.__setitem__(p, o)) for p in taps]
        if embed:
            self.handles.append(mods[embed].register_forward_pre_hook(lambda m, i: setattr(self, "emb", i[0])))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class KDCallback(Callback):
    """Replaces the loss with the distillation loss. Teacher outputs are computed without grad; student
    features come from hooks installed for the duration of training only (removed in on_train_end)."""

    def __init__(self, teacher: nn.Module, cfg: KDConfig):
        self.cfg = cfg
        self.teacher_model = teacher.train(cfg.online)
        for p in teacher.parameters():
            p.requires_grad_(cfg.online)
        self._s: _Hooks | None = None
        self._t: _Hooks | None = None
        self._t_fwd: nn.Module = self.teacher_model
        self._t_home: torch.device | None = None
        # online teacher: its optimizer is built on train begin (it needs the trainer's config); a resumed state
        # waits in _pending until then (Trainer.fit restores callbacks before on_train_begin)
        self.t_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None
        self._t_loss: torch.Tensor | None = None
        self.history: list[dict] = []

    @property
    def teacher_forward(self) -> nn.Module:
        """The module the loss runs the teacher through: the teacher itself, or its compiled / DDP-wrapped form
        while training (``TrainConfig.compile``, torchrun)."""
        return self._t_fwd

    @property
    def name(self) -> str:     # offline and online KD checkpoint different state: a resume must not mix them
        return "kd-online" if self.cfg.online else "kd"

    def state_dict(self) -> dict:
        if not self.cfg.online:
            return {}
        if self.t_optimizer is None:     # saved before training began: whatever was restored, unchanged
            return self._pending or {}
        return {"teacher": self.teacher_model.state_dict(), "optimizer": self.t_optimizer.state_dict(),
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        if self.cfg.online and state:
            self._pending = state

    def _online_begin(self, trainer) -> None:
        from .distributed import wrap
        from .train.loop import build_optimizer

        self.teacher_model.to(trainer.device).train()
        if trainer.config.channels_last:
            self.teacher_model.to(memory_format=torch.channels_last)
        self.t_optimizer = build_optimizer(self.teacher_model, trainer.config)
        for g in self.t_optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
        if self._pending:
            self.teacher_model.load_state_dict(self._pending["teacher"])
            self.t_optimizer.load_state_dict(self._pending["optimizer"])
            self.history = list(self._pending.get("history", []))
            self._pending = None
        self._t_fwd = wrap(self.teacher_model, trainer.device)      # DDP under torchrun: the teacher's gradients are averaged too

    def on_train_begin(self, trainer) -> None:
        c = self.cfg
        emb = _embed_module(trainer.model, c) if (c.rkd_distance or c.rkd_angle) else None
        taps = tuple(c.taps) if (c.graph or c.hint) else ()
        if (c.graph or c.hint) and not taps:
            raise SparseforgeError("KDConfig: graph / hint weights need taps, e.g. taps = [\"layer1\", \"layer2\"]")
        from .utils import model_device

        # the teacher runs where the student trains, and goes back where it was when training ends
        self._t_home = model_device(self.teacher_model)
        self.teacher_model.to(trainer.device)
        self._s = _Hooks(trainer.model, taps, emb)
        self._t = _Hooks(self.teacher_model, taps, emb)
        self._t_fwd = self.teacher_model
        if c.online:
            self._online_begin(trainer)
            if getattr(trainer.config, "compile", False) and not taps and emb is None:
                try:
                    self._t_fwd = torch.compile(self._t_fwd, dynamic=False)
                except Exception as e:  # pragma: no cover - depends on the toolchain
                    trainer.log(f"warning: torch.compile unavailable for the teacher ({e}); it runs eagerly")
        elif getattr(trainer.config, "compile", False) and not taps and emb is None:
            # the frozen teacher is a third of a KD step's arithmetic: compiled with its weights as constants
            # (BN folded, ~1.2-1.5x the eager forward's speed for ResNet-56 on 2 cores). Feature terms read
            # module hooks, which a compiled graph would not call: then the teacher stays eager.
            try:
                self._t_fwd = torch.compile(self.teacher_model, options={"freezing": True}, dynamic=False)
            except Exception as e:  # pragma: no cover - depends on the toolchain
                trainer.log(f"warning: torch.compile unavailable for the teacher ({e}); it runs eagerly")

    def on_train_end(self, trainer) -> None:
        for h in (self._s, self._t):
            if h is not None:
                h.remove()
        self._t_fwd = self.teacher_model
        if self.cfg.online:
            self.teacher_model.eval()
        if self._t_home is not None:
            self.teacher_model.to(self._t_home)

    def on_after_backward(self, trainer) -> None:
        """Online teacher: its own step on the same batch, after the student's backward (outside autocast), at
        the student's learning-rate factor for this step."""
        if self._t_loss is None:
            return
        self._t_loss.backward()
        self._t_loss = None
        f = trainer.current_lr_factor()
        for g in self.t_optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        self.t_optimizer.step()
        self.t_optimizer.zero_grad(set_to_none=True)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        if not self.cfg.online:
            return
        from .train.loop import evaluate

        rec: dict = {"epoch": epoch + 1}
        if trainer.test_loader is not None and "test_acc" in metrics:
            rec["teacher_test_acc"] = evaluate(self.teacher_model, trainer.test_loader)["acc"]
            self.teacher_model.train()
            if trainer.is_main:
                trainer.log(f"epoch {epoch + 1}: online teacher test acc {rec['teacher_test_acc']:.2f}%")
        self.history.append(rec)

    def on_loss(self, trainer, loss, logits, x, y):
        c = self.cfg
        if self._s is None:
            if c.graph or c.hint or c.rkd_distance or c.rkd_angle:
                # the hooks must be in place before the student's forward, which has already run
                raise SparseforgeError("KDCallback with feature terms (graph / hint / RKD) was used before "
                                       "on_train_begin(trainer): Trainer.fit calls it; a custom loop must too")
            self.on_train_begin(trainer)
        if c.online:
            if self.t_optimizer is None:
                self._online_begin(trainer)
            # train-mode forward with grad: the same logits teach the student (detached) and train the teacher
            t_out = self._t_fwd(x).float()
            self._t_loss = trainer.loss_fn(t_out, y)
            t_logits = t_out.detach()
        else:
            with torch.no_grad():
                t_logits = self._t_fwd(x).float()       # bf16 under TrainConfig.precision='bf16'
        kl = F.kl_div(F.log_softmax(logits / c.T, 1), F.log_softmax(t_logits / c.T, 1), reduction="batchmean",
                      log_target=True)
        out = c.alpha * c.T ** 2 * kl + (1 - c.alpha) * loss     # loss: the trainer's CE (hard or soft targets)
        # feature losses in fp32 even in bf16 training: relations and relative errors of nearly equal maps
        with trainer.full_precision():
            s_emb, t_emb = (None, None) if self._s.emb is None else (self._s.emb.float(), self._t.emb.float())
            s_f = [self._s.out[p].float() for p in c.taps] if (c.graph or c.hint) else []
            t_f = [self._t.out[p].float() for p in c.taps] if (c.graph or c.hint) else []
            if c.rkd_distance:
                out = out + c.rkd_distance * rkd_distance_loss(s_emb, t_emb)
            if c.rkd_angle:
                out = out + c.rkd_angle * rkd_angle_loss(s_emb, t_emb)
            if c.graph:
                out = out + graph_kd_loss(s_f, t_f, weight=c.graph)
            if c.hint:
                out = out + c.hint * hint_loss(s_f, t_f)
        return out


__all__ += ["KDConfig", "KDCallback"]
