"""``DepthConfig``: remove whole residual branches (layer pruning) until the network has ``mac_ratio`` of its MACs.

Why depth and not only width: a CIFAR ResNet's layers are narrow (16-64 channels), and a narrow convolution
runs far below the machine's peak in any runtime, so removing channels saves MACs but much less time. Removing
a block (its branch becomes the identity: ``relu(x)`` of an already non-negative ``x``) saves its whole time.
Measured on ResNet-56, batch 32, 2 threads, PyTorch channels_last (``bench/structured_latency.py``, paired
medians of 16 rounds): per-layer channel pruning to 0.45 of the MACs ran 1.52x faster, dropping blocks to 0.47
of the MACs 1.96x (5, 3, 5 blocks kept per stage) to 2.11x (``DepthConfig(mac_ratio=0.5, importance="bn")``).

Importance of a block (which branch to drop):
  ``bn``     mean |gamma| of the branch's last BatchNorm: how loudly the branch writes into the stream (data-free)
  ``output`` ||branch(x)|| / ||x|| on calibration inputs: the branch's relative contribution
  ``loss``   the increase of the training loss on calibration batches when the branch is dropped, re-measured
             after every removal (greedy): blocks that only matter together are not all dropped.
Only blocks whose shortcut is the identity are candidates (``keep_downsampling``): dropping a downsampling
block's branch would leave a zero-padded, subsampled copy of its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, ConfigError, opt
from ..errors import SparseforgeError
from .prune import layer_macs


@dataclass(frozen=True)
class DepthConfig(Config):
    """Drop whole residual branches (lowest importance first) until the model has ``mac_ratio`` of its MACs
    (or ``blocks`` branches are gone); the result is a shallower dense network."""

    importance: Literal["bn", "output", "loss"] = opt("loss", "block importance: bn (|gamma| of the branch's "
                                                              "last BN), output (relative branch output norm), "
                                                              "loss (greedy loss increase on calibration data)")
    mac_ratio: float = opt(0.0, "target: pruned MACs / original MACs (e.g. 0.5); 0 = use blocks", min=0.0, max=1.0)
    blocks: int = opt(0, "target: number of residual branches to drop; 0 = use mac_ratio", min=0)
    ignored_layers: tuple[str, ...] = opt((), "blocks (module names, globs) never dropped")
    keep_downsampling: bool = opt(True, "never drop a block whose shortcut is not the identity")
    calibration_batches: int = opt(4, "recipe stage: training batches used by the output / loss criteria", min=1)
    regularize_epochs: int = opt(0, "recipe stage: choose the blocks now, train this many epochs with a growing "
                                    "L2 penalty on their last BatchNorm's scale and shift (the branch fades out "
                                    "while the rest adapts), then drop them; 0 = drop at once", min=0)
    reg_max: float = opt(1.0, "growing regularisation: the penalty coefficient reached halfway through", min=0.0)
    inplace_epochs: int = opt(0, "recipe stage: choose the blocks now, then train this many epochs in place: every "
                                 "step trains the full net on the labels and the shallow sub-network (the chosen "
                                 "branches skipped, weights shared) on the full net's soft outputs; then drop "
                                 "them; 0 = drop at once", min=0)
    inplace_T: float = opt(5.0, "in-place distillation: softmax temperature", min=1e-3)
    inplace_alpha: float = opt(0.9, "in-place distillation: weight of the soft targets (1 - alpha on the labels)",
                               min=0.0, max=1.0)
    inplace_warmup: float = opt(0.0, "in-place distillation: epochs over which the shallow net's loss weight rises "
                                     "from 0 to 1 (0 = full weight from the first step)", min=0.0)

    def validate(self) -> None:
        if (self.mac_ratio > 0) == (self.blocks > 0):
            raise ConfigError("DepthConfig needs exactly one target: mac_ratio (e.g. 0.5) or blocks (e.g. 10)")
        if self.regularize_epochs and self.inplace_epochs:
            raise ConfigError("DepthConfig: choose one of regularize_epochs (fade the branches out) and "
                              "inplace_epochs (train the shallow net inside the deep one), not both")


def candidate_blocks(model: nn.Module, cfg: DepthConfig) -> list[str]:
    """Names of the residual blocks whose branch may be dropped."""
    from fnmatch import fnmatch

    out = []
    for name, m in model.named_modules():
        if not hasattr(m, "remove_branch") or getattr(m, "branch_removed", False):
            continue
        if any(fnmatch(name, g) for g in cfg.ignored_layers):
            continue
        if not getattr(m, "branch_removable", True):
            continue
        if cfg.keep_downsampling and not _identity_skip(m):
            continue
        out.append(name)
    return out


def _identity_skip(m: nn.Module) -> bool:
    return isinstance(getattr(m, "shortcut", None), nn.Identity) or getattr(m, "use_residual", False) is True


def _skip(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    sc = getattr(m, "shortcut", None)
    return sc(x) if sc is not None else x


def block_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs of one image through each residual block's branch (conv and linear layers inside the block)."""
    owner = {}
    for name, m in model.named_modules():
        if hasattr(m, "remove_branch"):
            for sub in m.modules():
                if isinstance(sub, nn.Conv2d | nn.Linear):
                    owner[sub] = name
    out = {n: 0 for n in set(owner.values())}
    for m, macs in layer_macs(model, example_input).items():
        if m in owner:
            out[owner[m]] += macs
    return out


def _branch_last_bn(block: nn.Module) -> nn.Module | None:
    bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return bns[-1] if bns else None


def _score_bn(model: nn.Module, names: list[str]) -> dict[str, float]:
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        bn = _branch_last_bn(mods[n])
        if bn is None or not bn.affine:
            raise SparseforgeError(f"DepthConfig(importance='bn'): block {n} has no affine BatchNorm; use "
                                   "importance='output' or 'loss'")
        out[n] = float(bn.weight.detach().abs().mean())
    return out


def _score_output(model: nn.Module, names: list[str], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """||block(x) - x|| / ||x|| summed over calibration batches (the branch's share of the stream)."""
    mods = dict(model.named_modules())
    acc = {n: [0.0, 0.0] for n in names}

    def hook(name):
        def h(m, inp, out):
            x = inp[0]
            acc[name][0] += float((out - _skip(m, x)).norm())
            acc[name][1] += float(x.norm())
        return h

    hs = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for h in hs:
            h.remove()
    return {n: a / max(b, 1e-12) for n, (a, b) in acc.items()}


class _Replay:
    """The greedy loss search, about twice as fast: with candidate ``n`` dropped, every block that runs before ``n``
    computes exactly what it computed in the reference pass (eval mode, same inputs), so it hands back its recorded
    output (a copy: a later in-place op must not change the record) instead of running. Blocks called more than once
    per forward (shared weights) turn the replay off; the search then runs full forwards. Memory: every block's output
    on the calibration batches (ResNet-56, 4 batches of 128: 27 x 512 outputs, ~0.53 GB)."""

    def __init__(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.model = model
        self.batches = batches
        self.blocks = {n: m for n, m in model.named_modules() if hasattr(m, "remove_branch")}
        self.order: list[str] = []
        self.out: dict[str, list[torch.Tensor]] = {n: [] for n in self.blocks}
        self.i = 0

        def rec(name):
            def h(m, inp, o):
                if name not in self.order:
                    self.order.append(name)
                self.out[name].append(o.detach())
            return h

        hs = [m.register_forward_hook(rec(n)) for n, m in self.blocks.items()]
        try:
            self.ref = self._run()
        finally:
            for h in hs:
                h.remove()
        self.ok = all(len(v) == len(batches) for k, v in self.out.items() if k in self.order)

    def _run(self) -> float:
        tot = 0.0
        with torch.no_grad():
            for self.i, (x, y) in enumerate(self.batches):
                tot += float(F.cross_entropy(self.model(x), y, reduction="sum"))
        return tot / max(1, sum(len(y) for _, y in self.batches))

    def loss_without(self, name: str) -> float:
        before = self.order[: self.order.index(name)] if self.ok and name in self.order else []
        for b in before:
            self.blocks[b].forward = (lambda b: lambda *a, **k: self.out[b][self.i].clone())(b)
        try:
            with _Dropped(self.blocks[name]):
                return self._run()
        finally:
            for b in before:
                del self.blocks[b].forward


class _Dropped:
    """Temporarily make one block's forward the branch-free path (restored on exit)."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __enter__(self):
        self.block.branch_removed = True

    def __exit__(self, *exc):
        del self.block.branch_removed     # back to the class default (False)


def plan_depth(model: nn.Module, cfg: DepthConfig, example_input: torch.Tensor | None = None,
               calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[dict]:
    """The blocks ``cfg`` drops, in order: ``[{"block", "score", "mac_ratio"}, ...]`` (the model is not changed).

    ``calibration``: (images, labels) batches for importance 'output' / 'loss' (the recipe stage passes
    ``calibration_batches`` training batches)."""
    import copy

    from .prune import count_macs

    if example_input is None:
        raise SparseforgeError("depth pruning counts MACs: pass example_input=torch.randn(1, 3, 32, 32)")
    batches = list(calibration) if calibration is not None else []
    if cfg.importance in ("output", "loss") and not batches:
        raise SparseforgeError(f"DepthConfig(importance={cfg.importance!r}) needs data: pass calibration=[(images, "
                               "labels), ...] (a few training batches), or use importance='bn'")
    model = copy.deepcopy(model)       # the greedy search drops branches as it goes
    model.eval()
    names = candidate_blocks(model, cfg)
    if not names:
        raise SparseforgeError("DepthConfig: the model has no residual block that can be dropped (blocks need an "
                               "identity shortcut and a remove_branch() method, as sparseforge's CIFAR ResNets have)")
    mods = dict(model.named_modules())
    base = count_macs(model, example_input)
    macs = block_macs(model, example_input)
    total = base
    history: list[dict] = []

    def done() -> bool:
        return (len(history) >= cfg.blocks) if cfg.blocks else (total / base <= cfg.mac_ratio)

    static = (_score_bn(model, names) if cfg.importance == "bn"
              else _score_output(model, names, batches) if cfg.importance == "output" else None)
    while not done() and names:
        if static is not None:
            scores = {n: static[n] for n in names}
        else:
            replay = _Replay(model, batches)       # the reference pass, recording every block's output
            scores = {n: replay.loss_without(n) - replay.ref for n in names}
        pick = min(names, key=lambda n: scores[n])
        mods[pick].remove_branch()
        names.remove(pick)
        total -= macs[pick]
        history.append({"block": pick, "score": scores[pick], "mac_ratio": total / base})
    if not done():
        raise SparseforgeError(f"DepthConfig: dropping every candidate block reaches only {total / base:.3f} of the "
                               f"MACs (target {cfg.mac_ratio}); lower the target or combine with StructuredConfig")
    return history


def drop_blocks(model: nn.Module, blocks: Iterable[str], history: list[dict] | None = None) -> nn.Module:
    """A copy of ``model`` with the residual branches of ``blocks`` removed (checkpoint spec updated)."""
    import copy

    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    for n in blocks:
        if n not in mods or not hasattr(mods[n], "remove_branch"):
            raise SparseforgeError(f"drop_blocks: {n!r} is not a residual block of this model")
        mods[n].remove_branch()
    if hasattr(model, "sf_spec"):       # checkpoints rebuild the shallower network from this spec
        from .surgery import arch_of

        model.sf_spec = dict(model.sf_spec, arch=arch_of(model))
    model.sf_depth_history = list(history) if history is not None else [{"block": n} for n in blocks]
    return model


def prune_depth(model: nn.Module, cfg: DepthConfig, example_input: torch.Tensor | None = None,
                calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None, **_) -> nn.Module:
    """Returns a new model with the chosen residual branches removed (the input model is left unchanged).

    ``calibration``: (images, labels) batches for importance 'output' / 'loss' (the recipe stage passes
    ``calibration_batches`` training batches)."""
    if cfg.regularize_epochs or cfg.inplace_epochs:
        import warnings

        which = "regularize_epochs" if cfg.regularize_epochs else "inplace_epochs"
        warnings.warn(f"DepthConfig.{which} needs training: prune() drops the blocks at once. Use a recipe "
                      "'depth' stage, or structured.growing_depth() / InplaceDepthCallback with a Trainer",
                      stacklevel=3)
    history = plan_depth(model, cfg, example_input, calibration)
    return drop_blocks(model, [h["block"] for h in history], history)


def growing_depth(model: nn.Module, blocks: Iterable[str], reg_max: float = 1.0):
    """Growing regularisation for whole blocks: a callback whose L2 penalty (rising from 0 to ``reg_max``) pulls
    the scale and shift of each chosen block's last BatchNorm to zero. That BN's output is what the branch adds to
    the stream, so the branch fades out while the rest of the network learns to do without it; dropping it
    afterwards (``drop_blocks``) changes little. Why: an abrupt cut of 14 of ResNet-56's 27 blocks leaves a net at
    54% accuracy that fine-tuning must win back, under a teacher or a budget that caps it."""
    from .regrow import GrowingRegCallback

    mods = dict(model.named_modules())
    slices = []
    for n in blocks:
        bn = _branch_last_bn(mods[n]) if n in mods else None
        if bn is None or not bn.affine:
            raise SparseforgeError(f"growing_depth: block {n!r} has no affine BatchNorm to fade; drop it at once "
                                   "(DepthConfig(regularize_epochs=0))")
        idx = torch.arange(bn.num_features)
        slices += [(bn.weight, idx), (bn.bias, idx)]
    return GrowingRegCallback(slices, reg_max)


__all__ = ["DepthConfig", "prune_depth", "plan_depth", "drop_blocks", "growing_depth", "candidate_blocks", "block_macs"]
