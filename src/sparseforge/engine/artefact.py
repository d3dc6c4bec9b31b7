"""Engine artefacts: a self-contained directory (source, library, weights, manifest with hashes).

Loading verifies every file's sha256 against the manifest (and the manifest's
own hash), and refuses a library built for CPU features this machine lacks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from safetensors.numpy import load_file, save_file

from ..errors import SparseforgeError
from ..report.env import cpu_flags
from ..utils import atomic_write_text, sha256_file
from .runtime import CompiledModel

FILES = ("kernel.c", "kernel.so", "blobs.safetensors", "spec.json")


def _manifest_hash(m: dict) -> str:
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_engine(engine: CompiledModel, path: Path) -> Path:
    if engine._torch_ops:
        names = ", ".join(op.name for op in engine._torch_ops.values())
        raise SparseforgeError(f"this engine runs PyTorch fallbacks ({names}); saving supports fully generated "
                               "engines only -- keep the model and recompile instead")
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise SparseforgeError(f"{path} exists and is not empty; choose a new path (artefacts are never overwritten)")
    tmp = path.with_name(path.name + ".tmp-write")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_write_text(tmp / "kernel.c", engine.source)
    shutil.copyfile(engine.lib_path, tmp / "kernel.so")
    save_file({"floats": engine._floats.numpy(), "ints": engine._ints.numpy()}, str(tmp / "blobs.safetensors"))
    atomic_write_text(tmp / "spec.json", json.dumps(engine.spec, indent=1, sort_keys=True))
    flags = engine.spec.get("build", {}).get("flags", [])
    manifest = {
        "format": "sparseforge-engine-artefact-1",
        "files": {f: sha256_file(tmp / f) for f in FILES},
        "cpu_flags_required": cpu_flags() if "-march=native" in flags else [],
        "threads": engine.spec["threads"],
        "input_shape": engine.spec["input_shape"],
    }
    manifest["manifest_sha256"] = _manifest_hash(manifest)
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    if path.exists():
        path.rmdir()
    tmp.rename(path)
    return path


def load_engine(path: str | Path) -> CompiledModel:
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.exists():
        raise SparseforgeError(f"{path} is not an engine artefact (no manifest.json); create one with engine.save(path)")
    try:
        manifest = json.loads(mf.read_text())
    except ValueError as e:
        raise SparseforgeError(f"{mf} is corrupt ({e})") from None
    if manifest.get("format") != "sparseforge-engine-artefact-1":
        raise SparseforgeError(f"{path}: unknown artefact format {manifest.get('format')!r}")
    if manifest.get("manifest_sha256") != _manifest_hash(manifest):
        raise SparseforgeError(f"{mf} was modified (hash mismatch); refusing to load a tampered artefact")
    for f in FILES:
        p = path / f
        if not p.exists() or sha256_file(p) != manifest["files"][f]:
            raise SparseforgeError(f"{p} is missing or was modified (sha256 mismatch); refusing to load. "
                                   "Recompile the model to get a fresh artefact")
    need = set(manifest.get("cpu_flags_required", []))
    have = set(cpu_flags())
    lacking = sorted(need - have)
    if lacking:
        raise SparseforgeError(f"{path} was built for CPU features this machine lacks ({', '.join(lacking)}); "
                               "recompile on this machine (or compile with portable=True to run anywhere)")
    spec = json.loads((path / "spec.json").read_text())
    blobs = load_file(str(path / "blobs.safetensors"))
    source = (path / "kernel.c").read_text()
    return CompiledModel(spec, path / "kernel.so", blobs["floats"], blobs["ints"], {}, source, artefact_dir=path)
