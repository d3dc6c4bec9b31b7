"""The run directory's layout: every name sparseforge writes into a run, in one place (base layer).

    <run>/recipe.toml | config.toml     what the run computes (a recipe run | a plain training run)
    <run>/start.json                    the start model's evaluation
    <run>/checkpoints/                  trainer checkpoints + latest.json (commit pointer)
    <run>/metrics.jsonl                 one line per epoch
    <run>/stages/NN-method/             a recipe stage: its own checkpoints, then model.safetensors + done.json
    <run>/model.safetensors             the final model (masks and pattern library inside)
    <run>/results.json, report.md, report.html
"""

from __future__ import annotations

from pathlib import Path

RECIPE = "recipe.toml"
CONFIG = "config.toml"
START = "start.json"
STAGES = "stages"
MODEL = "model.safetensors"
DONE = "done.json"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


def stage_dir(run_dir: str | Path, index: int, method: str) -> Path:
    """Where stage ``index`` (running ``method``) of a recipe run keeps its files."""
    return Path(run_dir) / STAGES / f"{index:02d}-{method}"
