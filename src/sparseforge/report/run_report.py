"""report.md + results.json for a recipe run: accuracy per stage, sparsity per layer, pattern library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..utils import atomic_write_json, atomic_write_text
from .env import environment
from .plots import plot_layer_sparsity, plot_pattern_library
from .stats import model_stats
from .. import rundir


def sparsity_summary(model: nn.Module, input_shape=(1, 3, 32, 32)) -> dict[str, Any]:
    from ..sparsity import library_strings
    from ..sparsity.pattern import COUNTS_BUFFER

    st = model_stats(model, torch.zeros(*input_shape))
    conv_lin = [l for l in st.layers]
    prunable_params = sum(l.params for l in conv_lin)
    prunable_nz = sum(l.nonzero for l in conv_lin)
    counts = getattr(model, COUNTS_BUFFER, None)
    return {
        "stats": st.as_dict(),
        "conv_linear_params": prunable_params,
        "conv_linear_nonzero": prunable_nz,
        "compression_conv_linear": prunable_params / max(1, prunable_nz),
        "mac_reduction": st.macs / max(1, st.effective_macs),
        "library": library_strings(model),
        "library_counts": counts.tolist() if isinstance(counts, torch.Tensor) else None,
        "_st": st,
    }


def _torch_latency(model: nn.Module, runs: int = 20) -> float:
    import copy
    import statistics
    import time

    import torch.fx.experimental.optimization as fx_opt

    m = fx_opt.fuse(copy.deepcopy(model).eval())
    x = torch.randn(1, 3, 32, 32)
    ts = []
    with torch.inference_mode():
        for _ in range(3):
            m(x)
        for _ in range(runs):
            t0 = time.perf_counter()
            m(x)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _widths(arch_start: dict[str, Any], model: nn.Module) -> list[str]:
    """Per-layer widths before/after when a structural stage changed them (plus MACs and parameters)."""
    from ..structured import arch_of, count_macs, count_params
    from ..models import model_from_spec

    now = arch_of(model)
    # layers present before and after (re-parameterization renames the folded ones: it has its own section)
    changed = [n for n, s in now["layers"].items() if s.get("type") == "conv" and n in arch_start["layers"]
               and arch_start["layers"][n] != s]
    if not changed and not now["removed_branches"]:
        return []
    import torch

    x = torch.randn(1, 3, 32, 32)
    lines = ["## Structure", ""]
    spec = getattr(model, "sf_spec", None)
    if spec:
        before = model_from_spec({**spec, "arch": None})
        mb, ma, pb, pa = count_macs(before, x), count_macs(model, x), count_params(before), count_params(model)
        lines += [f"- MACs per image: {ma:,} of {mb:,} ({mb / max(1, ma):.2f}x fewer)",
                  f"- parameters: {pa:,} of {pb:,} ({pb / max(1, pa):.2f}x fewer)"]
        tb, ta = _torch_latency(before), _torch_latency(model)
        lines += [f"- measured PyTorch latency, batch 1, {torch.get_num_threads()} threads, BN folded, median of 20 "
                  f"each: {1e3 * ta:.2f} ms vs {1e3 * tb:.2f} ms unpruned ({tb / ta:.2f}x)", ""]
    if now["removed_branches"]:
        blocks = sum(1 for m in model.modules() if hasattr(m, "remove_branch"))
        lines += [f"- residual branches removed ({len(now['removed_branches'])} of {blocks} blocks): "
                  f"{', '.join(now['removed_branches'])}", ""]
    if changed:
        lines += ["| layer | in before -> after | out before -> after |", "|---|---:|---:|"]
        for n in changed:
            a, b = arch_start["layers"][n], now["layers"][n]
            lines.append(f"| {n} | {a['in']} -> {b['in']} | {a['out']} -> {b['out']} |")
        lines.append("")
    return lines


def write_run_report(run_dir: Path, model: nn.Module, recipe, results: dict[str, Any]) -> dict[str, Any]:
    """Write results.json, report.md and plots; return the results as written."""
    summ = sparsity_summary(model)
    st = summ.pop("_st")
    results = {**results, "sparsity": summ, "env": environment(), "recipe": recipe.to_dict()}
    atomic_write_json(run_dir / rundir.RESULTS, results)
    plots = []
    if summ["library"]:
        from ..sparsity import get_library

        plot_pattern_library(get_library(model), summ["library_counts"], run_dir / "pattern_library.png")
        plots.append(("Pattern library", "pattern_library.png"))
    plot_layer_sparsity([l.name for l in st.layers], [l.nonzero / max(1, l.params) for l in st.layers],
                        run_dir / "layer_sparsity.png")
    plots.append(("Sparsity per layer", "layer_sparsity.png"))
    lines = [f"# sparseforge run: {recipe.model} on {recipe.dataset}", ""]
    lines += ["## Accuracy", "", "| step | test top-1 | time |", "|---|---:|---:|",
              f"| start ({recipe.weights or 'random init'}) | {results['start']['acc']:.2f}% | |"]
    for i, s in enumerate(results["stages"]):
        lines.append(f"| {i}: {s.get('method', '?')} | {s['eval']['acc']:.2f}% | {s.get('seconds', 0):.0f} s |")
    lines += ["", f"Test set: {results['start'].get('n', '?')} images. Compare only with a dense control trained with the "
              "same budget on the same data.", ""]
    lines += ["## Sparsity", "",
              f"- conv + linear weights: {summ['conv_linear_nonzero']:,} non-zero of {summ['conv_linear_params']:,} "
              f"({summ['compression_conv_linear']:.2f}x fewer)",
              f"- MACs per image: {st.effective_macs:,} effective of {st.macs:,} dense ({summ['mac_reduction']:.2f}x fewer)", ""]
    if summ["library"]:
        lines += ["## Pattern library", "", "Patterns as 3x3 row-major 0/1 (centre always kept):", "",
                  "| # | pattern | best-fit count |", "|---:|---|---:|"]
        for i, p in enumerate(summ["library"]):
            c = summ["library_counts"][i] if summ["library_counts"] else ""
            lines.append(f"| {i + 1} | `{p[:3]}/{p[3:6]}/{p[6:]}` | {c} |")
        lines.append("")
    for title, f in plots:
        lines += [f"![{title}]({f})", ""]
    for i, s in enumerate(results["stages"]):
        if s.get("admm"):
            lines += [f"## ADMM (stage {i})", "", "| update | rho | abs(W-Z)/abs(W) | abs(W-Y)/abs(W) |", "|---:|---:|---:|---:|"]
            for r in s["admm"]:
                lines.append(f"| {r['update']} | {r['rho']:.3g} | {r['residual_pattern']:.4f} | {r['residual_connectivity']:.4f} |")
            lines.append("")
    if results.get("arch_start"):
        lines += _widths(results["arch_start"], model)
    for i, s_ in enumerate(results["stages"]):
        if s_.get("latency"):
            lines += _latency(i, s_, run_dir, plots)
        if s_.get("lipschitz"):
            lines += _robustness(i, s_["lipschitz"], run_dir)
        if s_.get("int8"):
            lines += _int8(i, s_["int8"])
        if s_.get("reparameterize"):
            r = s_["reparameterize"]
            lines += [f"## Re-parameterization (stage {i})", "",
                      f"{r['folded_blocks']} blocks folded into their inference form.", "",
                      "| | train form | folded |", "|---|---:|---:|",
                      f"| parameters | {r['before']['params']:,} | {r['after']['params']:,} |",
                      f"| MACs per image | {r['before']['macs']:,} | {r['after']['macs']:,} |"]
            if r.get("latency"):
                lat = r["latency"]
                lines.append(f"| PyTorch latency, batch 1, {lat['threads']} threads (median ms) | "
                             f"{lat['train form']['median_ms']:.3f} | {lat['folded']['median_ms']:.3f} |")
            lines.append("")
    lines += ["## Layers", "", st.to_markdown(), ""]
    env = results["env"]
    lines += ["## Environment", "", f"{env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, "
              f"sparseforge {env['sparseforge']}", ""]
    atomic_write_text(run_dir / rundir.REPORT_MD, "\n".join(lines))
    from .html import markdown_to_html

    atomic_write_text(run_dir / rundir.REPORT_HTML, markdown_to_html("\n".join(lines), run_dir,
                                                                title=f"sparseforge: {recipe.model}"))
    return results


def _robustness(i: int, curves: dict[str, dict[str, float]], run_dir: Path) -> list[str]:
    from .robustness import plot_lipschitz

    fname = f"robustness_stage{i}.png"
    plot_lipschitz({n: {float(k): v for k, v in c.items()} for n, c in curves.items()}, run_dir / fname)
    names = list(curves)
    eps = list(curves[names[0]])
    lines = ["## Robustness (localized Lipschitz estimate)", "",
             "max over test images and random directions of ||softmax f(x+d) - softmax f(x)|| / ||d||, ||d|| = eps", "",
             "| eps | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for e in eps:
        lines.append(f"| {e} | " + " | ".join(f"{curves[n][e]:.4f}" for n in names) + " |")
    return lines + ["", f"![Robustness]({fname})", ""]


def _int8(i: int, q: dict[str, Any]) -> list[str]:
    """Accuracy before/after post-training int8 and the measured latency of the int8 engine and the QDQ export."""
    lines = [f"## int8 (stage {i})", "",
             f"- calibration: {q['calibration']} on {q['calibration_images']} training images"
             + (f" (scores: {', '.join(f'{k} {v:.4g}' for k, v in q['scores'].items())})" if q.get("scores") else ""),
             f"- test top-1: fp32 {q['acc_fp32']:.2f}% -> int8 {q['acc_int8']:.2f}% ({q['delta_pt']:+.2f} pt; "
             "the integer reference, bit for bit what the QDQ export holds)"]
    if q.get("fallbacks"):
        lines.append(f"- ops kept in float (dequantize, PyTorch, requantize): {', '.join(q['fallbacks'])}")
    lat = q.get("latency")
    if lat:
        lines += ["", f"Measured latency, batch {lat['batch']}, {lat['threads']} threads (median, p10-p90 ms):", "",
                  "| runtime | median | p10 | p90 |", "|---|---:|---:|---:|"]
        for arm, r in lat["arms"].items():
            lines.append(f"| {arm} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} |")
        if lat.get("engine"):
            lines += ["", f"sparseforge-int8: {lat['engine']}"]
    return lines + [""]


def _latency(i: int, s: dict[str, Any], run_dir: Path, plots: list) -> list[str]:
    """Measured latency table (median, p10-p90) and the engine's per-op time breakdown."""
    from .plots import plt

    lines = [f"## Measured latency (stage {i}: {s['threads']} threads)", "",
             "| batch | arm | median ms | p10-p90 ms | vs PyTorch dense |", "|---:|---|---:|---:|---:|"]
    for b, arms in s["latency"].items():
        base = arms["torch-dense"]["median_ms"]
        for name, r in arms.items():
            lines.append(f"| {b} | {name} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} | "
                         f"{base / r['median_ms']:.2f}x |")
    lines += ["", f"Engine output vs PyTorch: max relative error {max(s['max_rel_err'].values()):.2e}; "
              f"{s['latency'][next(iter(s['latency']))]['sparseforge']['runs']} timed runs per arm, arms alternating "
              "with a pause between blocks.", ""]
    ops = s.get("engine_ops") or []
    if ops:
        fname = f"engine_ops_stage{i}.png"
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.18 * len(ops))))
        ax.barh([o["name"] for o in ops][::-1], [o["us"] for o in ops][::-1],
                color=["tab:blue" if o["path"] == "generated" else "tab:orange" for o in ops][::-1])
        ax.set_xlabel("us per op, batch 1 (orange: PyTorch fallback)")
        ax.tick_params(axis="y", labelsize=6)
        fig.tight_layout()
        fig.savefig(run_dir / fname, dpi=110)
        plt.close(fig)
        lines += [f"![Per-op engine time]({fname})", ""]
        fb = [o["name"] for o in ops if o["path"] != "generated"]
        lines += [f"{len(ops) - len(fb)}/{len(ops)} ops run as generated kernels"
                  + (f"; PyTorch fallbacks: {', '.join(fb)}" if fb else "") + ".", ""]
    return lines
