"""Model registry, ``create_model`` and safe weight loading.

Weights are read without unpickling arbitrary objects: safetensors for our own
files, ``torch.load(weights_only=True)`` for foreign ``.pt/.th`` files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import CheckpointError, SparseforgeError
from ..registry import Registry
from .cifar_resnet import BasicBlock, CifarResNet, PadShortcut
from .ghostnet import GhostBottleneck, GhostModule, GhostNet
from .imagenet import (MobileNetV2ImageNet, ResNet, ShuffleNetV2, VGGImageNet, resnet18, resnet34, resnet50,
                       resnext50_32x4d)
from .mobilenetv2 import MobileNetV2
from .reparam import REPARAMETERIZABLE, RepVGGBlock, reparameterizable, reparameterize
from .repghost import RepGhostBottleneck, RepGhostModule, RepGhostNet
from .small import SmallCNN
from .vgg import VGG

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

for _d in (20, 32, 44, 56, 110):
    MODELS.register(f"resnet{_d}", (lambda d: lambda num_classes=10, **kw: CifarResNet(d, num_classes, **kw))(_d))
MODELS.register("vgg16", lambda num_classes=10, **kw: VGG(num_classes=num_classes, **kw))
MODELS.register("mobilenetv2", lambda num_classes=10, **kw: MobileNetV2(num_classes=num_classes, **kw))
MODELS.register("repghostnet", lambda num_classes=10, width=1.0, input_size=32, **kw:
                RepGhostNet(num_classes=num_classes, width=width, input_size=input_size, **kw))
MODELS.register("ghostnet", lambda num_classes=10, width=1.0, input_size=32, **kw:
                GhostNet(num_classes=num_classes, width=width, input_size=input_size, **kw))
MODELS.register("smallcnn", lambda num_classes=10, **kw: SmallCNN(num_classes=num_classes, **kw))
# ImageNet-size (224x224), torchvision's layouts and module names; 1000 classes unless told
MODELS.register("resnet18", lambda num_classes=1000: resnet18(num_classes))
MODELS.register("resnet34", lambda num_classes=1000: resnet34(num_classes))
MODELS.register("resnet50", lambda num_classes=1000, **kw: resnet50(num_classes, **kw))
MODELS.register("resnext50_32x4d", lambda num_classes=1000, **kw: resnext50_32x4d(num_classes, **kw))
MODELS.register("vgg16_bn", lambda num_classes=1000, **kw: VGGImageNet(num_classes=num_classes, **kw))
MODELS.register("mobilenet_v2", lambda num_classes=1000, **kw: MobileNetV2ImageNet(num_classes=num_classes, **kw))
for _w, _n in ((0.5, "x0_5"), (1.0, "x1_0"), (1.5, "x1_5"), (2.0, "x2_0")):
    MODELS.register(f"shufflenet_v2_{_n}", (lambda w: lambda num_classes=1000: ShuffleNetV2(w, num_classes))(_w))


def create_model(name: str, num_classes: int | None = None, arch: dict | None = None, **kw: Any) -> nn.Module:
    """Build a registered model; the (name, kwargs) spec is kept on the model so checkpoints can rebuild it.

    ``arch``: the layer sizes of a structurally pruned model (``sparseforge.structured.arch_of``; saved in
    every checkpoint's metadata), so a physically smaller network is rebuilt without pickling.
    """
    factory = MODELS.get(name)
    try:     # num_classes None: the model's own default (10 for the CIFAR models, 1000 for the ImageNet ones)
        model = factory(**kw) if num_classes is None else factory(num_classes=num_classes, **kw)
    except TypeError as e:
        raise SparseforgeError(f"model {name!r} does not accept these options: {e}") from None
    if num_classes is None:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        num_classes = heads[-1].out_features if heads else 10
    kw_plain = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    model.sf_spec = {"name": name.lower(), "num_classes": num_classes, "kwargs": kw_plain}
    if arch is not None:
        from .arch import apply_arch

        apply_arch(model, arch)
        model.sf_spec["arch"] = arch
    return model


def spec_from_metadata(meta: dict[str, str], path: str | Path = "") -> dict[str, Any] | None:
    """The model description in a weights file's metadata, validated (None when the file does not say): a file
    from elsewhere may hold anything there, and a bad value must be one clear error, not a traceback."""
    from ..errors import CheckpointError

    raw = meta.get("model")
    if not raw:
        return None
    fix = "re-save the weights with sparseforge, or pass --model NAME"
    try:
        spec = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path}: its 'model' metadata is not JSON ({raw[:40]!r}); {fix}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise CheckpointError(f"{path}: its 'model' metadata is not an object with a model name; {fix}")
    nc = spec.get("num_classes", 10)
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise CheckpointError(f"{path}: its 'model' metadata has num_classes={nc!r} (a positive integer is needed); {fix}")
    if not isinstance(spec.get("kwargs", {}), dict):
        raise CheckpointError(f"{path}: its 'model' metadata has kwargs that are not an object; {fix}")
    return spec


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint's metadata describes (name, kwargs, its re-parameterized (folded) form and,
    if pruned, its layer sizes)."""
    if spec.get("reparameterized"):
        model = create_model(spec["name"], num_classes=spec.get("num_classes", 10), **spec.get("kwargs", {}))
        model = mark_reparameterized(reparameterize(model))
        if spec.get("arch") is not None:
            from .arch import apply_arch

            apply_arch(model, spec["arch"])
            model.sf_spec["arch"] = spec["arch"]
        return model
    return create_model(spec["name"], num_classes=spec.get("num_classes", 10), arch=spec.get("arch"),
                        **spec.get("kwargs", {}))


def mark_reparameterized(model: nn.Module) -> nn.Module:
    """Record in the model's spec that it is in its folded form, so saved weights rebuild into that form."""
    if getattr(model, "sf_spec", None) is not None:
        model.sf_spec = {**model.sf_spec, "reparameterized": True}
    return model


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, "sf_spec", None)


def list_models() -> list[str]:
    return MODELS.names()


_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors from a safetensors file or a foreign torch file, safely.

    Returns ``(tensors, metadata)``; the metadata comes from the safetensors header (empty for torch files).
    """
    p = Path(path)
    if p.is_dir():
        from ..checkpoint import latest_checkpoint

        ck = latest_checkpoint(p)
        if ck is None:
            raise CheckpointError(f"{p} is a directory without checkpoints; pass a .safetensors/.pt file or a run directory")
        p = ck.weights_path
    if not p.exists():
        raise CheckpointError(f"weights file {p} not found; check the path")
    if p.stat().st_size == 0:
        raise CheckpointError(f"weights file {p} is empty (truncated download or interrupted write); re-create it")
    if _is_safetensors(p):
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for torn files
            raise CheckpointError(f"{p} is truncated or corrupt ({type(e).__name__}: {e}); re-create or re-download it") from None
        return tensors, meta
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(
            f"cannot read {p} as weights: not safetensors, and torch.load(weights_only=True) refused it ({msg}). "
            "Pass a .safetensors file or a plain PyTorch state_dict file"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} does not hold a state_dict (name -> tensor); save model.state_dict() instead")
    return dict(obj), {}


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load weights into ``model`` in place and return it.

    Accepts our safetensors checkpoints (file or run directory) and foreign ``.pt/.th``
    state dicts (``module.`` prefix stripped). With ``strict`` every key and shape must
    match; BatchNorm's ``num_batches_tracked`` may be absent (old checkpoints lack it).
    """
    from ..masks import COUNTS_BUFFER, LIBRARY_BUFFER, MASK_BUFFER, apply_masks, attach_mask, set_library

    sd, meta = read_state_dict(path)
    sd = _strip_prefix(sd)
    # sparsity artefacts travel with the weights: masks (buffers next to each weight) and the pattern library
    suffix = "." + MASK_BUFFER
    modules = dict(model.named_modules())
    masks = {k[: -len(suffix)]: sd.pop(k) for k in [k for k in sd if k.endswith(suffix)]}
    library, counts = sd.pop(LIBRARY_BUFFER, None), sd.pop(COUNTS_BUFFER, None)
    own = {k: v for k, v in model.state_dict().items()
           if not k.endswith(suffix) and k not in (LIBRARY_BUFFER, COUNTS_BUFFER)}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    unexpected += [f"{n}{suffix}" for n in masks if n not in modules or not hasattr(modules[n], "weight")]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
    mismatched += [f"{n}{suffix} {tuple(t.shape)} vs {tuple(modules[n].weight.shape)}" for n, t in masks.items()
                   if n in modules and hasattr(modules[n], "weight") and modules[n].weight.shape != t.shape]
    if strict and (missing or unexpected or mismatched):
        spec = model_spec(model)
        arch = spec["name"] if spec else type(model).__name__
        saved = ""
        if meta.get("model"):
            try:
                saved = f" (the file says it holds {json.loads(meta['model'])['name']})"
            except (ValueError, KeyError, TypeError):
                pass
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{path} does not fit model {arch}{saved}: {'; '.join(parts)}. "
            "Create the model the weights were saved from, or pass strict=False"
        )
    load = {k: v for k, v in sd.items() if k in own and sd[k].shape == own[k].shape}
    bad = [k for k, v in load.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds NaN or Inf values in {len(bad)} tensors ({', '.join(bad[:3])}); the "
                              "run that saved them diverged: use an earlier checkpoint or retrain with a lower lr")
    for k, v in load.items():
        if own[k].dtype != v.dtype and not k.endswith("num_batches_tracked"):
            load[k] = v.to(own[k].dtype)
    model.load_state_dict(load, strict=False)
    for name, mask in masks.items():
        mod = modules.get(name)
        if mod is not None and getattr(mod, "weight", None) is not None and mod.weight.shape == mask.shape:
            attach_mask(mod, mask)
    if library is not None:
        set_library(model, library, counts)
    apply_masks(model)
    return model


def save_weights(model: nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the state_dict (masks and pattern library included) as safetensors, atomically."""
    from safetensors.torch import save

    from ..utils import atomic_write_bytes

    meta = {"format": "sparseforge-weights-1", **(extra_metadata or {})}
    spec = model_spec(model)
    if spec is not None:
        meta["model"] = json.dumps(spec)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))
    return Path(path)


def load_model(path: str | Path) -> nn.Module:
    """The network a sparseforge weights file holds, rebuilt from the file's own metadata (name, options, folded
    form, pruned widths) with its weights, masks and pattern library, in eval mode: what a later script needs to
    evaluate or compile a saved model without knowing how it was made."""
    path = Path(path)
    spec = spec_from_metadata(read_state_dict(path)[1], path)
    if spec is None:
        raise CheckpointError(f"{path} does not say which model it holds (a state dict from elsewhere): build the "
                              "model with create_model(NAME) and load it with load_weights")
    return load_weights(model_from_spec(spec), path).eval()


__all__ = [
    "MODELS", "create_model", "model_from_spec", "spec_from_metadata", "load_weights", "load_model", "save_weights", "read_state_dict", "list_models", "model_spec",
    "CifarResNet", "BasicBlock", "PadShortcut", "VGG", "MobileNetV2", "SmallCNN", "ResNet", "VGGImageNet",
    "resnet18", "resnet34", "resnet50", "resnext50_32x4d", "ShuffleNetV2",
    "MobileNetV2ImageNet", "RepGhostNet", "RepGhostModule", "RepGhostBottleneck", "GhostNet", "GhostModule",
    "GhostBottleneck", "RepVGGBlock", "reparameterize",
    "reparameterizable", "REPARAMETERIZABLE",
]
