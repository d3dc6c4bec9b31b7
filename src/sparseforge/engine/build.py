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
from ..hardware import all_cpu_flags, cpu_flags, cpu_model
from .codegen import MAIN_MARK, UNIT_MARK

NATIVE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=fast", "-fno-math-errno"]
PORTABLE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=fast", "-fno-math-errno"]
# x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE -- what every AVX2 machine this project meets has (Zen 2/3,
# Haswell and later), and none of AVX-512: an AVX-512 host builds and tests the code an AVX2-only host runs
AVX2_FLAGS = ["-O3", "-march=x86-64-v3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=fast", "-fno-math-errno"]
ISA_FLAGS = {"native": NATIVE_FLAGS, "avx2": AVX2_FLAGS, "portable": PORTABLE_FLAGS}
AVX2_NEEDS = ("avx2", "fma", "bmi2", "f16c", "movbe")


def resolve_isa(isa: str | None, portable: bool = False) -> str:
    """The instruction set to build for: ``native`` (-march=native: this CPU, AVX-512 where it has it), ``avx2``
    (x86-64-v3: the code an AVX2-only CPU runs, buildable and testable on any AVX2 host) or ``portable`` (any
    x86-64). ``portable=True`` is the older spelling of ``isa="portable"``."""
    if isa is None:
        return "portable" if portable else "native"
    if isa not in ISA_FLAGS:
        raise SparseforgeError(f"isa must be one of {', '.join(ISA_FLAGS)}, got {isa!r}")
    if portable and isa != "portable":
        raise SparseforgeError(f"portable=True and isa={isa!r} disagree: pass only isa")
    if isa == "avx2":
        lacking = [f for f in AVX2_NEEDS if f not in all_cpu_flags()]
        if lacking:
            raise SparseforgeError(f"isa='avx2' needs a CPU with {', '.join(AVX2_NEEDS)}; this one lacks "
                                   f"{', '.join(lacking)}: use isa='native' or isa='portable'")
    return isa


def target_flags(isa: str) -> set[str]:
    """The CPU features code built for ``isa`` may use (planning decisions ask this, never the host directly)."""
    if isa == "native":
        return set(all_cpu_flags())
    if isa == "avx2":
        return {"avx", "avx2", "fma", "f16c", "sse4_1", "sse4_2"}
    return set()


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
    """The cache key of a build. ``-march=native`` code is this CPU's: the key includes its model and vector ISA
    flags, so a cache shared with another CPU (a network home, an image moved to another host) never hands it a
    library with instructions it lacks (a crash on load: SIGILL)."""
    h = hashlib.sha256()
    parts = [source, " ".join(flags), compiler_version(cc)]
    if "-march=native" in flags:
        parts.append(cpu_model() + " | " + " ".join(cpu_flags()))
    for part in parts:
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


def split_units(source: str) -> tuple[str, list[str], str]:
    """(header, units, main): the source before the first unit (prelude and declarations), each conv body, and
    the rest. Header + any units + main is valid C on its own, so each piece compiles apart."""
    if MAIN_MARK not in source or UNIT_MARK not in source:
        return source, [], ""
    pre, main = source.split(MAIN_MARK, 1)
    header, *units = pre.split(UNIT_MARK)
    return header, units, main


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def _compile(cc: str, flags: list[str], source: str, d: Path, tmp: str, jobs: int) -> subprocess.CompletedProcess:
    """Compile to ``tmp`` (a shared library). With ``jobs`` > 1 the conv bodies are spread over ``jobs`` - 1
    object files by size (largest first onto the lightest), compiled at once beside the main part, then linked:
    ResNet-50's cold build is bounded by its largest group, not the sum (gcc -O3 on unrolled bodies dominates)."""
    temps: list[str] = []

    def write(text: str, suffix: str) -> str:
        fd, path = tempfile.mkstemp(dir=d, prefix="tmp-", suffix=suffix)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        temps.append(path)
        return path

    try:
        header, units, main = split_units(source)
        if jobs <= 1 or len(units) < 2:
            src = write(source, ".c")
            return subprocess.run([cc, *flags, src, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=600)
        groups: list[list[str]] = [[] for _ in range(min(jobs - 1, len(units)))]
        sizes = [0] * len(groups)
        for u in sorted(units, key=len, reverse=True):
            g = min(range(len(groups)), key=lambda j: (sizes[j], j))
            groups[g].append(u)
            sizes[g] += len(u)
        cflags = [f for f in flags if f != "-shared"] + ["-c"]
        procs, objs = [], []
        for text in [main] + ["".join(g) for g in groups]:
            src = write(header + text, ".c")
            obj = src[:-2] + ".o"
            temps.append(obj)
            objs.append(obj)
            procs.append(subprocess.Popen([cc, *cflags, src, "-o", obj], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        errors = []
        for p in procs:
            _, err = p.communicate(timeout=600)
            if p.returncode != 0:
                errors.append(err)
        if errors:
            return subprocess.CompletedProcess(procs[0].args, 1, "", "\n".join(errors))
        link = [f for f in flags if f in ("-shared", "-fopenmp", "-fPIC")]
        return subprocess.run([cc, *link, *objs, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=600)
    finally:
        for t in temps:
            if os.path.exists(t):
                os.unlink(t)


def build(source: str, portable: bool = False, jobs: int | None = None, isa: str | None = None) -> tuple[Path, dict]:
    """Compile ``source`` to a shared library; returns (path, info). Uses the cache when possible.

    The source is always written afresh to private temp files (a ``kernel.c`` found in the cache is never
    compiled), and a cached library is loaded only after its size and hash match the record its build wrote
    (``kernel.so.json``, written atomically after the library): a truncated or replaced entry is rebuilt.
    ``jobs``: compiler processes at once (default: the CPUs this process may use); the library is the same.
    ``isa``: see ``resolve_isa``; only a failed ``native`` build falls back to ``portable`` (a compiler that does
    not know this CPU), an explicit ISA's failure is an error."""
    cc = compiler()
    isa = resolve_isa(isa, portable)
    flags = ISA_FLAGS[isa]
    key = build_key(source, flags, cc)
    d = cache_root() / key[:32]
    lib, record = d / "kernel.so", d / "kernel.so.json"
    info = {"key": key, "flags": flags, "isa": isa, "compiler": compiler_version(cc), "cached": False}
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
    fd, tmp = tempfile.mkstemp(dir=d, prefix="tmp-", suffix=".so")
    os.close(fd)
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    info["jobs"] = jobs
    try:
        r = _compile(cc, flags, source, d, tmp, jobs)
        if r.returncode != 0 and isa == "native":
            return build(source, jobs=jobs, isa="portable")
        if r.returncode != 0:
            errors = [ln for ln in r.stderr.splitlines() if "error" in ln] or r.stderr.strip().splitlines()
            raise SparseforgeError(f"C compilation failed ({cc}): {' | '.join(errors)[:800]}")
        data = Path(tmp).read_bytes()
        os.replace(tmp, lib)
        src_tmp = d / f"tmp-{os.getpid()}-kernel.c"
        src_tmp.write_text(source)
        os.replace(src_tmp, d / "kernel.c")          # for reading only: never compiled from here
        rec_tmp = d / f"tmp-{os.getpid()}-record.json"
        rec_tmp.write_text(json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
        os.replace(rec_tmp, record)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib, info
