"""Stage 5: build -- compile the generated C with the system compiler, cached by content hash.

The cache key covers the source, the flags and the compiler's version. A
build writes to a temp file and renames it into place, so two processes
compiling the same model at once both succeed and leave one entry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import SparseforgeError

NATIVE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=fast", "-fno-math-errno"]
PORTABLE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=fast", "-fno-math-errno"]


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEFORGE_CACHE", Path.home() / ".cache" / "sparseforge")) / "engine"


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise SparseforgeError("no C compiler found (gcc/cc); install gcc or set CC")
    return cc


def compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except Exception:  # pragma: no cover
        return "unknown"


def build_key(source: str, flags: list[str], cc: str) -> str:
    h = hashlib.sha256()
    for part in (source, " ".join(flags), compiler_version(cc)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def build(source: str, portable: bool = False) -> tuple[Path, dict]:
    """Compile ``source`` to a shared library; returns (path, info). Uses the cache when possible."""
    cc = compiler()
    flags = PORTABLE_FLAGS if portable else NATIVE_FLAGS
    key = build_key(source, flags, cc)
    d = cache_root() / key[:32]
    lib = d / "kernel.so"
    info = {"key": key, "flags": flags, "compiler": compiler_version(cc), "cached": lib.exists()}
    if lib.exists():
        return lib, info
    d.mkdir(parents=True, exist_ok=True)
    src = d / "kernel.c"
    if not src.exists():
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".c.tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, src)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(src), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0 and not portable:
            os.unlink(tmp)
            return build(source, portable=True)
        if r.returncode != 0:
            raise SparseforgeError(f"C compilation failed ({cc}): {r.stderr.strip()[:500]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib, info
