"""Fuzz the compiler against PyTorch with many more cases than CI.

Run: python bench/engine_fuzz.py [--cases 3000]; writes bench/results/engine_fuzz.json.
Tolerance as in tests: max |engine - torch| <= 1e-4 * max |torch| + 1e-6.

python bench/engine_fuzz.py --networks 3000: whole generated networks (engine.testing.random_network), every other
one as a feature extractor with a NaN and an Inf in its input, every eighth one a network around a sparse stride-2
conv on a map large enough for a phase split (random_phase_network); writes bench/results/engine_fuzz_networks.json.
Tolerance: max |engine - torch| <= 1e-4 * max |torch| + 1e-5 over finite values, NaN/Inf exactly where PyTorch has
them (sparse networks: the engine may be finite where PyTorch multiplies a pruned zero by NaN/Inf, never the reverse).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparseforge.engine import compile  # noqa: E402
from sparseforge.engine.testing import Case, build_case, valid  # noqa: E402
from sparseforge.report.env import cpu_flags, environment  # noqa: E402
from sparseforge.utils import atomic_write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--networks", type=int, default=0, help="generated whole networks instead of layers")
    ap.add_argument("--resume", action="store_true", help="--networks: continue a killed run from its --out file")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--isa", choices=["native", "avx2", "portable"], default="native",
                    help="--networks: build for this instruction set (avx2: the code an AVX2-only CPU runs)")
    a = ap.parse_args()
    os.environ["SPARSEFORGE_CACHE"] = tempfile.mkdtemp(prefix="sf-fuzz-")
    if a.networks:
        return fuzz_networks(a)
    a.out = a.out or str(ROOT / "bench" / "results" / "engine_fuzz.json")
    stats = {"cases": 0, "fused_cases": 0, "max_rel_err": 0.0, "failures": []}
    cases = st.builds(
        Case, cin=st.integers(1, 96), cout=st.integers(1, 96), h=st.integers(1, 40), w=st.integers(1, 40),
        k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1]), bias=st.booleans(),
        bn=st.booleans(), act=st.sampled_from(["none", "relu", "relu6"]), residual=st.booleans(),
        depthwise=st.booleans(), second=st.booleans(),
        sparsity=st.sampled_from(["dense", "pattern", "kernels", "empty_filters", "zero"]),
        batch=st.integers(1, 3), seed=st.integers(0, 2**16)).filter(valid)
    # inverted-residual blocks (fused into one op on maps of <= 64 pixels), batches up to 5 so whole-image
    # rounds and leftover images both run
    inverted = st.builds(
        Case, cin=st.integers(1, 40), cout=st.integers(1, 96), h=st.integers(1, 12), w=st.integers(1, 12),
        k=st.just(1), stride=st.just(1), pad=st.just(0), bias=st.booleans(), bn=st.booleans(),
        act=st.sampled_from(["none", "relu", "relu6"]), residual=st.booleans(), depthwise=st.just(False),
        second=st.just(False), sparsity=st.sampled_from(["dense", "pattern", "kernels", "empty_filters", "zero"]),
        batch=st.integers(1, 5), seed=st.integers(0, 2**16), inverted=st.just(True))
    cases = st.one_of(cases, cases, cases, inverted)

    widths = [8, 16] if "avx512f" in cpu_flags() else [8]

    @settings(max_examples=a.cases, deadline=None, database=None,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(cases, st.sampled_from(widths), st.sampled_from(["auto", "gather", "direct"]), st.sampled_from([2, 2, 1, 3]))
    def check(case, width, mode, threads):
        m, x = build_case(case)
        with torch.inference_mode():
            ref = m(x)
        e = compile(m, x[:1], threads=threads, vector_width=width, conv_mode=mode)
        stats["fused_cases"] += any("fused_block" in op for op in e.spec["ops"])
        out = e(x)
        err = float((out - ref).abs().max())
        scale = float(ref.abs().max())
        stats["cases"] += 1
        stats["max_rel_err"] = max(stats["max_rel_err"], err / max(scale, 1e-12) if scale > 0 else err)
        if err > 1e-4 * scale + 1e-6:
            stats["failures"].append({"case": case.__dict__, "width": width, "mode": mode, "threads": threads, "err": err, "scale": scale})
            raise AssertionError(case)

    t0 = time.perf_counter()
    try:
        check()
        ok = True
    except AssertionError:
        ok = False
    doc = {"benchmark": "engine_fuzz", "ok": ok, **stats, "seconds": round(time.perf_counter() - t0, 1), "env": environment()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2, default=str))
    print(json.dumps({k: v for k, v in doc.items() if k != "env"}, default=str))


def fuzz_networks(a: argparse.Namespace) -> None:
    import torch.nn as nn

    from _fuzz import resume_point  # bench/ is on sys.path when this script runs
    from sparseforge.engine.testing import compare_outputs, random_network, random_phase_network, with_nonfinite

    out_path = Path(a.out or ROOT / "bench" / "results" / "engine_fuzz_networks.json")
    from sparseforge.engine.plan import PlanOptions

    stats = {"networks": 0, "max_rel_err": 0.0, "max_rel_err_seed": None, "nonfinite_inputs": 0, "sparse": 0, "native_ops": 0, "fallback_ops": 0,
             "fallback_kinds": {}, "stress_options": 0, "conv_modes": {}, "channel_blocked_convs": 0, "row_tiled_convs": 0,
             "phase_networks": 0, "phase_merged_convs": 0,
             "se_multiplies_fused": 0, "run_threads_checked": 0, "failures": []}
    # every fourth network is planned with knobs that push CIFAR-size maps into the large-map paths (tiled flat
    # mode from 4 KB inputs, input-channel blocks from 8 KB windows, dense 1x1 GEMM mode on any map with 16-float
    # rows, in odd 5 x 3 register blocks, gather mode on maps of <= 16 pixels from 8 input channels (the default
    # 128 is more than the generator draws: the fuzz never reached gather mode before), so more sparse stride-2 3x3
    # convs become a phase split and a flat-tiled 2x2 conv), so those are fuzzed on every kind of block, and run
    # with barriers instead of the default claimed parts (on the engine's own pool; every other one of them in
    # OpenMP regions), and with every dilated and non-square conv embedded (by default only those that keep at most
    # half their kernels, not grouped, are; the others run in oneDNN); every fifth multi-thread network also runs on one thread (run_threads): the same bits
    stress = PlanOptions(flat_tiled_min_bytes=1 << 12, flat_cblock_bytes=1 << 13, flat_gemm_min_pixels=0, gemm_mr=5,
                         gemm_nr=3, claim_parts=False, gather_max=16, gather_min_cin=8, embed_max_kernels=1.0,
                         embed_grouped=True)
    stress_omp = dataclasses.replace(stress, thread_pool=False)
    stats, start, spent = resume_point(out_path, a.first_seed, stats, a.resume)
    t0 = time.perf_counter() - spent

    def write(complete: bool, next_seed: int) -> None:
        doc = {"benchmark": "engine_fuzz_networks", "ok": not stats["failures"], "first_seed": a.first_seed, "isa": a.isa,
               "requested": a.networks, "complete": complete, "next_seed": next_seed,
               "tolerance": "max|e-t| <= 1e-4*max|t| + 1e-5 over finite values; NaN/Inf positions as PyTorch's",
               **stats, "seconds": round(time.perf_counter() - t0, 1), "env": environment()}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_path, doc)
        if complete:
            print(json.dumps({k: v for k, v in doc.items() if k not in ("env", "fallback_kinds")}, default=str))

    for seed in range(start, a.first_seed + a.networks):
        # every eighth: a network around a sparse stride-2 conv on a map large enough for a phase split, which
        # the generator's maps rarely are (the split's conv may run the original kernels: PlanOptions.phase_merge)
        phase = seed % 8 == 5
        m, x, desc = random_phase_network(seed) if phase else random_network(seed)
        stats["phase_networks"] += phase
        # code written in forward (testing.Idiom, FunctionalPool, testing.Resize, the flatten head's view/reshape forms)
        idioms = stats.setdefault("forward_idioms", {})
        for d in desc:
            kind = (d.split()[1] if d.startswith("idiom") else "functional_pool" if "FunctionalPool" in d
                    else "flatten_" + d.split("(")[1].split(")")[0] if d.startswith("flatten (")
                    else f"resize_{d.split()[1]}_{d.split()[2]}" if d.startswith("resize") else None)
            if kind is not None and not (kind.startswith("flatten_") and seed % 2):     # odd seeds drop the head
                idioms[kind] = idioms.get(kind, 0) + 1
        sparse = not any("sparsity dense" in d for d in desc)
        # grouped convs other than depthwise (ResNeXt's, ShuffleNet's 1x1, one group per input channel)
        stats["grouped_convs"] = stats.get("grouped_convs", 0) + sum(
            1 for c in m.modules() if isinstance(c, nn.Conv2d) and c.groups > 1
            and not c.groups == c.in_channels == c.out_channels)
        if seed % 2:
            if not phase:
                m = nn.Sequential(m.stem, m.blocks).eval()
            x = with_nonfinite(x, seed)
            stats["nonfinite_inputs"] += 1
        with torch.inference_mode():
            ref = m(x)
        e = compile(m, x[:1], threads=1 + seed % 3, isa=a.isa,
                    plan_options=(stress_omp if seed % 8 == 7 else stress) if seed % 4 == 3 else None)
        stats["stress_options"] += seed % 4 == 3
        out = e(x)
        ok, why = compare_outputs(out, ref, sparse=sparse)
        if ok and e.spec["threads"] > 1 and seed % 5 == 0:     # fewer threads at run time: the same bits
            e.run_threads = 1
            one = e(x)
            stats["run_threads_checked"] += 1
            if not torch.equal(torch.nan_to_num(one, nan=7.0), torch.nan_to_num(out, nan=7.0)) or \
                    not torch.equal(one.isnan(), out.isnan()):
                ok, why = False, "run_threads=1 differs from the compiled thread count"
        fin = ref.isfinite() & out.isfinite()
        if bool(fin.any()):
            rel = float((out[fin] - ref[fin]).abs().max() / ref[fin].abs().max().clamp_min(1e-12))
            if rel > stats["max_rel_err"]:
                stats["max_rel_err"], stats["max_rel_err_seed"] = rel, seed
        stats["networks"] += 1
        stats["sparse"] += sparse
        for op in e.spec["ops"]:
            stats["native_ops" if op["native"] else "fallback_ops"] += 1
            if "mode" in op:
                stats["conv_modes"][op["mode"]] = stats["conv_modes"].get(op["mode"], 0) + 1
                stats["channel_blocked_convs"] += op["channel_blocks"] > 1
                stats["row_tiled_convs"] += "row_tiles" in op
                stats["phase_merged_convs"] += "phase_planes" in op
                stats["se_multiplies_fused"] += "squeeze-excite multiply fused in" in op["describe"]
                stats["embedded_convs"] = stats.get("embedded_convs", 0) + ("(embeds " in op["describe"])
            if op["kind"] in ("gather", "resize"):      # channel gathers (chunk, shuffle, slices) and resizes
                stats[f"{op['kind']}_ops"] = stats.get(f"{op['kind']}_ops", 0) + 1
            if not op["native"]:
                kind = op["describe"].split("(")[0].strip()
                stats["fallback_kinds"][kind] = stats["fallback_kinds"].get(kind, 0) + 1
        if not ok:
            stats["failures"].append({"seed": seed, "why": why, "network": desc})
            print(f"seed {seed}: {why}: {' | '.join(desc)}", flush=True)
        if stats["networks"] % 100 == 0:
            print(f"{stats['networks']} networks, {len(stats['failures'])} mismatches, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            write(False, seed + 1)
    write(True, a.first_seed + a.networks)


if __name__ == "__main__":
    main()
