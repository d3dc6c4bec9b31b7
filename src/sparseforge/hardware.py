"""The CPU this process runs on (base layer: the compiler, the trainer and reports all ask)."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def all_cpu_flags() -> list[str]:
    """Every feature flag /proc/cpuinfo lists (cpu_flags() keeps the vector ones, for records)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def cpu_flags() -> list[str]:
    """The vector-ISA flags (what records and artefact manifests carry)."""
    return [f for f in all_cpu_flags() if f.startswith(("avx", "fma", "sse4", "f16c", "amx"))]
