"""What a measurement ran on: recorded next to every benchmark figure."""

from __future__ import annotations

import os
import platform
from typing import Any

from ..hardware import cpu_flags, cpu_model  # noqa: F401  (re-exported: report.env.cpu_flags)


def _installed(dist: str) -> str | None:
    """A peer runtime's version without importing it (onnxruntime stays optional)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    import numpy
    import torch

    from .. import __version__

    return {
        "sparseforge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        # the dense peers a speed ratio is taken against (absent: not installed)
        **{k: v for k in ("onnxruntime",) if (v := _installed(k)) is not None},
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        # what TrainConfig.device = "auto" would train on (benchmarks record it: a GPU-trained arm says so)
        "cuda": (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                 if torch.cuda.is_available() else f"none (torch built for CUDA {torch.version.cuda})"
                 if torch.version.cuda else "none (CPU-only torch build)"),
    }
