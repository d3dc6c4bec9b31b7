"""What the fuzz benches share: a long run written every 100 networks continues where a killed one stopped."""

from __future__ import annotations

import json
from pathlib import Path


def resume_point(out: Path, first_seed: int, stats: dict, resume: bool) -> tuple[dict, int, float]:
    """(stats, next seed, seconds spent) from an unfinished record of the same run at ``out``, else the fresh
    ``stats``, ``first_seed`` and 0."""
    if resume and out.exists():
        prev = json.loads(out.read_text())
        if prev.get("first_seed") == first_seed and not prev.get("complete", True):
            print(f"resuming at seed {prev['next_seed']} ({prev['networks']} networks done)", flush=True)
            return {k: prev.get(k, v) for k, v in stats.items()}, prev["next_seed"], prev["seconds"]
    return stats, first_seed, 0.0
