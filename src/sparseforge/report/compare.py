"""``sparseforge report RUN_DIR [RUN_DIR...]``: runs side by side, from their results.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SparseforgeError
from ..utils import atomic_write_text
from .html import markdown_to_html
from .. import rundir


def _latency(res: dict) -> tuple[str, str]:
    for s in res.get("stages", []):
        lat = s.get("latency", {}).get("1")
        if lat:
            return f"{lat['sparseforge']['median_ms']:.3f}", f"{lat['torch-dense']['median_ms']:.3f}"
    return "-", "-"


def compare_runs(runs: list[Path], out: Path) -> tuple[str, Path]:
    rows = ["| run | model | start top-1 | final top-1 | weights | MACs | engine ms (b1) | PyTorch dense ms (b1) |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        f = r / rundir.RESULTS
        if not f.is_file():
            raise SparseforgeError(f"{r} holds no results.json; pass run directories written by `sparseforge run`")
        res = json.loads(f.read_text())
        sp = res.get("sparsity", {})
        e, d = _latency(res)
        rows.append(f"| {r.name} | {res.get('recipe', {}).get('model', '?')} | {res['start']['acc']:.2f}% | "
                    f"{res['final']['acc']:.2f}% | {sp.get('compression_conv_linear', 1):.2f}x fewer | "
                    f"{sp.get('mac_reduction', 1):.2f}x fewer | {e} | {d} |")
    md = "\n".join(["# sparseforge runs compared", "", *rows, "",
                    "Accuracy compares only between runs on the same data with the same budget.", ""])
    atomic_write_text(out.with_suffix(".md"), md)
    html_path = out.with_suffix(".html")
    atomic_write_text(html_path, markdown_to_html(md, out.parent, title="sparseforge runs compared"))
    return md, html_path
