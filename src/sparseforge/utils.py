"""Small helpers shared across the package: atomic writes, hashing, threads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rundir

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it, even briefly, races with
    files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TEMP_SUFFIX = ".tmp"                 # atomic writes: ".<name>.<random>.tmp" beside the file, renamed over it
PARTIAL_DIR_SUFFIX = ".tmp-write"    # a folder written whole, then renamed into place (engine artefacts)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + fsync + rename, so a crash never leaves a torn file.

    The file gets the permissions a plain ``open(path, "w")`` would give it (the umask's, or those of the file it
    replaces), not the temp file's owner-only 0600: run directories and models are shared with other users and
    serving processes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def set_threads(threads: int | None) -> int:
    """Set torch intra-op threads (None/0 = leave as is) and return the count in effect."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def resolve_device(spec: str = "auto", local_rank: int | None = None):
    """The torch.device that ``TrainConfig.device`` names.

    ``auto`` is CUDA when this torch build sees a GPU, else the CPU. Under torchrun each process takes the GPU
    of its ``LOCAL_RANK`` (``cuda`` without an index). Asking for a device this build or machine lacks is an error
    that says what to do, never a silent fall back to the CPU: a run sized for a GPU would take days there.
    """
    import torch

    from .errors import ConfigError

    spec = (spec or "auto").strip().lower()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ConfigError(f"TrainConfig.device={spec!r}, but torch {torch.__version__} ({build}) sees no CUDA GPU; "
                              "use device = \"cpu\" (or \"auto\"), or install a CUDA build of torch on a GPU machine")
        index = int(spec.split(":", 1)[1]) if ":" in spec else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"TrainConfig.device={spec!r} (process {local_rank}), but only "
                              f"{torch.cuda.device_count()} CUDA device(s) are visible; pick one below that or "
                              "launch fewer processes per node")
        return torch.device("cuda", index)
    raise ConfigError(f"TrainConfig.device={spec!r} is not a device this toolkit trains on; use \"auto\", \"cpu\", "
                      "\"cuda\" or \"cuda:N\"")


def clean_temp_files(run_dir: Path) -> list[str]:
    """Remove what killed writers left in a run directory: atomic-write temps (``.<name>.<random>.tmp``) and
    half-written folders (``*`` + PARTIAL_DIR_SUFFIX). Called with the run's lock held, so no writer is active;
    nothing else is touched (finished files are only ever replaced by rename)."""
    import re

    run_dir = Path(run_dir)
    temp = re.compile(r"\..+\.[A-Za-z0-9_]{8}" + re.escape(TEMP_SUFFIX))      # atomic_write_bytes's mkstemp names
    # only where sparseforge writes: the run directory's top level and its own subfolders (a --run-dir that
    # holds other files keeps them all)
    paths = list(run_dir.glob("*"))
    for sub in (rundir.CHECKPOINTS, rundir.STAGES):
        if (run_dir / sub).is_dir():
            paths += list((run_dir / sub).rglob("*"))
    removed = []
    for p in sorted(set(paths)):
        name = p.name
        try:
            if p.is_file() and temp.fullmatch(name):
                p.unlink()
            elif p.is_dir() and name.endswith(PARTIAL_DIR_SUFFIX):
                shutil.rmtree(p)
            else:
                continue
        except OSError:
            continue
        removed.append(str(p.relative_to(run_dir)))
    return removed


class RunLock:
    """An advisory lock on a run directory (``<run_dir>/.lock``), held while one process works in it.

    A second run on the same directory fails at once instead of interleaving its checkpoints and metrics with
    the first. The OS drops the lock when the holder exits by any path (kill -9 included), so a killed run never
    leaves a stale lock behind; the pid in the file is only for the message."""

    NAME = ".lock"

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        from .errors import RunDirError

        try:
            import fcntl
        except ImportError:       # pragma: no cover - not a POSIX system: no locking
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except (NotADirectoryError, FileExistsError):
            raise RunDirError(f"{self.run_dir} is a file, not a run directory; choose another --run-dir") from None
        except OSError as e:
            raise RunDirError(f"cannot use {self.run_dir} as a run directory ({e.strerror}); "
                              "check its permissions or choose another --run-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.read(fd, 32).decode().strip() or "?"
            finally:
                os.close(fd)
            raise RunDirError(f"{self.run_dir} is in use by another sparseforge run (pid {pid}); wait for it to "
                              "finish or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        self.removed_temps = clean_temp_files(self.run_dir)
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)        # closing drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a model without any)."""
    import torch

    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
