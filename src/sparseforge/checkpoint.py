"""Atomic, resumable, pickle-free checkpoints.

A checkpoint is three files: ``<tag>.safetensors`` (model state),
``<tag>.state.safetensors`` (optimizer and callback tensors) and
``<tag>.json`` (epoch, step, RNG state, optimizer structure, config, hashes).
Each file is written to a temp name and renamed; ``latest.json`` is written
last and is the commit point, so a run killed at any instant resumes from the
last complete checkpoint. Hashes in the JSON catch files torn or edited later.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import platform
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from .errors import CheckpointError
from .utils import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file
from . import rundir

FORMAT = "sparseforge-checkpoint-1"


def versions() -> dict[str, str]:
    from . import __version__

    return {"sparseforge": __version__, "torch": torch.__version__, "python": platform.python_version()}


def split_state(state: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into flat tensors (by dotted key) and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"__list__": [walk(v, f"{key}.{i}") for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint {type(obj).__name__} at {key}")

    return tensors, walk(state, prefix)


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: join_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            items = [join_state(v, tensors) for v in skeleton["__list__"]]
            return tuple(items) if skeleton.get("tuple") else items
    return skeleton


@dataclasses.dataclass
class CheckpointRef:
    directory: Path
    tag: str

    @property
    def weights_path(self) -> Path:
        return self.directory / f"{self.tag}.safetensors"

    @property
    def state_path(self) -> Path:
        return self.directory / f"{self.tag}.state.safetensors"

    @property
    def meta_path(self) -> Path:
        return self.directory / f"{self.tag}.json"


def save_checkpoint(directory: Path, tag: str, model_state: dict[str, torch.Tensor], extra_state: dict[str, Any],
                    meta: dict[str, Any], model_spec: dict | None = None, keep: int = 2) -> CheckpointRef:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ref = CheckpointRef(directory, tag)
    st_meta = {"format": FORMAT}
    if model_spec is not None:
        st_meta["model"] = json.dumps(model_spec)
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, metadata=st_meta)
    tensors, skeleton = split_state(extra_state, "s")
    state_blob = st_save(tensors, metadata={"format": FORMAT})
    atomic_write_bytes(ref.weights_path, weights)
    atomic_write_bytes(ref.state_path, state_blob)
    full_meta = {
        "format": FORMAT,
        "tag": tag,
        "state": skeleton,
        "sha256": {"weights": sha256_bytes(weights), "state": sha256_bytes(state_blob)},
        "versions": versions(),
        "model": model_spec,
        **meta,
    }
    atomic_write_json(ref.meta_path, full_meta)
    atomic_write_json(directory / rundir.LATEST, {"tag": tag})
    _prune_old(directory, keep, tag)
    return ref


def _prune_old(directory: Path, keep: int, current: str) -> None:
    tags = sorted(p.name[: -len(".json")] for p in directory.glob("step-*.json"))
    for t in tags[:-keep]:
        if t == current:
            continue
        for suffix in (".safetensors", ".state.safetensors", ".json"):
            (directory / f"{t}{suffix}").unlink(missing_ok=True)


def latest_checkpoint(path: Path) -> CheckpointRef | None:
    """The last committed checkpoint in a run directory or its ``checkpoints/`` folder."""
    path = Path(path)
    for d in (path / rundir.CHECKPOINTS, path):
        pointer = d / rundir.LATEST
        if pointer.exists():
            try:
                tag = json.loads(pointer.read_text())["tag"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{pointer} is corrupt ({type(e).__name__}: {e}); delete it to start over") from None
            # a tag names files in this folder: nothing else (no paths, no other types)
            if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
                raise CheckpointError(f"{pointer} is corrupt (tag {tag!r} is not a checkpoint name); delete it to "
                                      "start over")
            return CheckpointRef(d, tag)
    return None


def load_checkpoint(ref: CheckpointRef) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Return (model_state, extra_state, meta), verifying hashes."""
    from safetensors.torch import load_file

    if not ref.meta_path.exists():
        raise CheckpointError(f"checkpoint {ref.meta_path} is missing; the run directory is incomplete")
    try:
        meta = json.loads(ref.meta_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{ref.meta_path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{ref.meta_path} is not a checkpoint record (a JSON {type(meta).__name__}); the "
                              "checkpoint is corrupt")
    hashes = meta.get("sha256")
    if not isinstance(hashes, dict) or not all(isinstance(hashes.get(k), str) for k in ("weights", "state")):
        raise CheckpointError(f"{ref.meta_path} has no sha256 of its files, so they cannot be verified; the "
                              "checkpoint is corrupt or not sparseforge's: restore it or start a new run")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ref.meta_path} is not a sparseforge checkpoint (format {meta.get('format')!r})")
    for key, p in (("weights", ref.weights_path), ("state", ref.state_path)):
        if not p.exists():
            raise CheckpointError(f"checkpoint file {p} is missing")
        if sha256_file(p) != hashes[key]:
            raise CheckpointError(f"checkpoint file {p} is truncated or modified (sha256 mismatch); restore it or start a new run")
    try:
        model_state = load_file(str(ref.weights_path))
        tensors = load_file(str(ref.state_path))
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {ref.tag}: {e}") from None
    return model_state, join_state(meta["state"], tensors), meta


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(cuda: bool = False) -> dict[str, Any]:
    """The CPU generator's state, and with ``cuda`` every CUDA device's (dropout and randomness drawn on the GPU)."""
    out: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    if cuda and torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
