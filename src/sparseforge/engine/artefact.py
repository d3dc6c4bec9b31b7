"""Engine artefacts are data, never code.

An artefact directory holds the folded graph (``graph.json`` + ``graph.safetensors``: every op's fields and
weights), the runtime spec, the generated C source (for reading and for a consistency check) and a manifest of
sha256 hashes. It holds no binary. Loading checks the hashes (to catch damage, not attackers: anyone who can
write the directory can recompute them), rebuilds the graph from the data, plans and generates the C source
again with *this* sparseforge, refuses the artefact if that source differs from the stored one (another engine
version made it: recompile), and builds the source into the content-addressed build cache (or finds it there,
verified). So loading an artefact trusts only this package and the local compiler: a library placed in the
directory, or a source edited to match recomputed hashes, is never compiled or loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..errors import SparseforgeError
from ..hardware import cpu_flags
from ..utils import PARTIAL_DIR_SUFFIX, atomic_write_text, sha256_file
from .ir import graph_from_data, graph_to_data

FORMAT = "sparseforge-engine-artefact-2"
FILES = ("kernel.c", "graph.json", "graph.safetensors", "spec.json")


def _manifest_hash(m: dict) -> str:
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_engine(engine, path: Path) -> Path:
    """Write ``engine`` (a CompiledModel with its folded graph) as an artefact directory at ``path`` (new)."""
    if engine._torch_ops:
        names = ", ".join(op.name for op in engine._torch_ops.values())
        raise SparseforgeError(f"this engine runs PyTorch fallbacks ({names}); saving supports fully generated "
                               "engines only -- keep the model and recompile instead")
    stages = getattr(engine, "stages", None)
    if stages is None or stages.graph is None or "options" not in engine.spec:
        raise SparseforgeError("this engine has no graph to save (made by an older sparseforge); recompile the model")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SparseforgeError(f"{path} exists and is not empty; choose a new path (artefacts are never overwritten)")
    data, tensors = graph_to_data(stages.graph)
    tmp = path.with_name(path.name + PARTIAL_DIR_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_write_text(tmp / "kernel.c", engine.source)
    atomic_write_text(tmp / "graph.json", json.dumps(data))
    save_file(tensors, str(tmp / "graph.safetensors"))
    spec = {k: v for k, v in engine.spec.items() if k != "build"}
    atomic_write_text(tmp / "spec.json", json.dumps(spec, indent=1, sort_keys=True))
    manifest = {
        "format": FORMAT,
        "files": {f: sha256_file(tmp / f) for f in FILES},
        "cpu_flags_required": _required_flags(engine.spec["options"]),
        "threads": engine.spec["threads"],
        "input_shape": engine.spec["input_shape"],
    }
    manifest["manifest_sha256"] = _manifest_hash(manifest)
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    if path.exists():
        path.rmdir()
    tmp.rename(path)
    return path


def _required_flags(options: dict) -> list[str]:
    """What the loading CPU must have: this one's vector features (native), AVX2's (isa "avx2"), or nothing."""
    if options.get("portable"):
        return []
    if options.get("isa") == "avx2":
        return ["avx", "avx2", "fma"]
    return cpu_flags()


def read_artefact(path: str | Path) -> tuple[Path, object, dict, str]:
    """Check an artefact directory (manifest, hashes, CPU features) and read it back as data: (path, graph,
    compile options, stored C source). Rebuilding the engine from it is ``load_engine`` (the compiler's)."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise SparseforgeError(f"{path} is not an engine artefact (no manifest.json); create one with engine.save(path)")
    try:
        manifest = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SparseforgeError(f"{mf} is corrupt ({e}); recompile the model to get a fresh artefact") from None
    if not isinstance(manifest, dict):
        raise SparseforgeError(f"{mf} is not a manifest (a JSON object is expected); recompile the model")
    if manifest.get("format") == "sparseforge-engine-artefact-1":
        raise SparseforgeError(f"{path} is an old artefact that ships a compiled library, which sparseforge no "
                               "longer loads; recompile the model and save it again")
    if manifest.get("format") != FORMAT:
        raise SparseforgeError(f"{path}: unknown artefact format {manifest.get('format')!r}")
    if manifest.get("manifest_sha256") != _manifest_hash(manifest):
        raise SparseforgeError(f"{mf} was modified (hash mismatch); refusing to load a tampered artefact")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise SparseforgeError(f"{mf} lacks its file hashes; recompile the model to get a fresh artefact")
    for f in FILES:
        p = path / f
        if not p.is_file() or sha256_file(p) != files.get(f):
            raise SparseforgeError(f"{p} is missing or was modified (sha256 mismatch); refusing to load. "
                                   "Recompile the model to get a fresh artefact")
    need = set(manifest.get("cpu_flags_required", []))
    lacking = sorted(need - set(cpu_flags()))
    if lacking:
        raise SparseforgeError(f"{path} was built for CPU features this machine lacks ({', '.join(lacking)}); "
                               "recompile on this machine (or compile with portable=True to run anywhere)")
    try:
        spec = json.loads((path / "spec.json").read_text())
        options = dict(spec["options"])
        graph = graph_from_data(json.loads((path / "graph.json").read_text()),
                                load_file(str(path / "graph.safetensors")))
    except Exception as e:  # malformed data of any kind: one message, never a half-loaded engine
        raise SparseforgeError(f"{path} holds a malformed graph or spec ({type(e).__name__}: {e}); "
                               "recompile the model") from None
    return path, graph, options, (path / "kernel.c").read_text()


__all__ = ["save_engine", "read_artefact", "FORMAT"]
