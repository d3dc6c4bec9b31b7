"""Stage 5: build -- compile the generated C with the system compiler, cached by content hash.

The cache key covers the source, the flags and the compiler's version. A
build writes to a temp file and renames it into place, so two processes
compiling the same model at once both succeed and leave one entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
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


def _verified(lib: Path, record: Path) -> bool:
    """A cache entry is used only if its size and sha256 match what the build that wrote it recorded."""
    try:
        rec = json.loads(record.read_text())
        if lib.stat().st_size != rec["size"]:
            return False
        return hashlib.sha256(lib.read_bytes()).hexdigest() == rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build(source: str, portable: bool = False) -> tuple[Path, dict]:
    """Compile ``source`` to a shared library; returns (path, info). Uses the cache when possible.

    The source is always written afresh to a private temp file (a ``kernel.c`` found in the cache is never
    compiled), and a cached library is loaded only after its size and hash match the record its build wrote
    (``kernel.so.json``, written atomically after the library): a truncated or replaced entry is rebuilt."""
    cc = compiler()
    flags = PORTABLE_FLAGS if portable else NATIVE_FLAGS
    key = build_key(source, flags, cc)
    d = cache_root() / key[:32]
    lib, record = d / "kernel.so", d / "kernel.so.json"
    info = {"key": key, "flags": flags, "compiler": compiler_version(cc), "cached": False}
    if lib.exists() and _verified(lib, record):
        info["cached"] = True
        return lib, info
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob("tmp-*"):          # left by a killed build (older than any build may run)
        try:
            if time.time() - stale.stat().st_mtime > 900:
                stale.unlink()
        except OSError:
            pass
    fd, src = tempfile.mkstemp(dir=d, prefix="tmp-", suffix=".c")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="tmp-", suffix=".so")
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, src, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0 and not portable:
            return build(source, portable=True)
        if r.returncode != 0:
            raise SparseforgeError(f"C compilation failed ({cc}): {r.stderr.strip()[:500]}")
        data = Path(tmp).read_bytes()
        os.replace(tmp, lib)
        os.replace(src, d / "kernel.c")          # for reading only: never compiled from here
        rec_tmp = d / f"tmp-{os.getpid()}-record.json"
        rec_tmp.write_text(json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
        os.replace(rec_tmp, record)
    finally:
        for t in (tmp, src):
            if os.path.exists(t):
                os.unlink(t)
    return lib, info
