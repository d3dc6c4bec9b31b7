"""Property-based fuzzing of the compiler: random single layers and small blocks vs PyTorch.

Tolerance: max |engine - torch| <= 1e-4 * max |torch| (+1e-6 absolute for all-zero outputs).
100 cases here (each compiles its own C kernel: 2.7 s a case on a 2-core AMD EPYC, where 300 cases took 820 s of CI);
bench/engine_fuzz.py runs 3000.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseforge.engine import compile
from sparseforge.engine.testing import Case, build_case, valid
from sparseforge.report.env import cpu_flags

pytestmark = pytest.mark.slow      # the fast tier (pytest -m "not slow") skips it; CI runs all

# 8-float vectors run everywhere; 16-float (AVX-512) code is checked where the CPU has it
WIDTHS = [8, 16] if "avx512f" in cpu_flags() else [8]

cases = st.builds(
    Case,
    cin=st.integers(1, 96), cout=st.integers(1, 96), h=st.integers(1, 40), w=st.integers(1, 40),
    k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), pad=st.sampled_from([0, 1]),
    bias=st.booleans(), bn=st.booleans(), act=st.sampled_from(["none", "relu", "relu6"]),
    residual=st.booleans(), depthwise=st.booleans(), second=st.booleans(),
    sparsity=st.sampled_from(["dense", "pattern", "kernels", "empty_filters", "zero"]),
    batch=st.integers(1, 3), seed=st.integers(0, 2**16),
).filter(valid)


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEFORGE_CACHE", str(tmp_path_factory.mktemp("fuzzcache")))
    yield
    mp.undo()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(cases, st.sampled_from(WIDTHS), st.sampled_from(["auto", "gather", "direct"]))
def test_compiled_block_matches_pytorch(case, width, mode):
    m, x = build_case(case)
    with torch.inference_mode():
        ref = m(x)
    e = compile(m, x[:1], threads=2, vector_width=width, conv_mode=mode)
    out = e(x)
    err = float((out - ref).abs().max())
    assert err <= 1e-4 * float(ref.abs().max()) + 1e-6, (case, width, mode, err)


inverted = st.builds(
    Case,
    cin=st.integers(1, 40), cout=st.integers(1, 96), h=st.integers(1, 10), w=st.integers(1, 10),
    k=st.just(1), stride=st.just(1), pad=st.just(0),
    bias=st.booleans(), bn=st.booleans(), act=st.sampled_from(["none", "relu", "relu6"]),
    residual=st.booleans(), depthwise=st.just(False), second=st.just(False),
    sparsity=st.sampled_from(["dense", "pattern", "kernels", "empty_filters", "zero"]),
    batch=st.integers(1, 5), seed=st.integers(0, 2**16), inverted=st.just(True),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inverted, st.sampled_from([1, 2, 3]))
def test_fused_inverted_block_matches_pytorch(case, threads):
    """expand -> depthwise -> project on small maps runs as one fused op (any batch: whole-image rounds and
    the split of the leftover images) when its 1x1 convs are sparser than blocked mode's threshold; larger maps
    and dense 1x1 convs run layer by layer. Same tolerance as above."""
    from sparseforge.engine.plan import DEFAULT_OPTIONS, _ochan

    m, x = build_case(case)
    with torch.inference_mode():
        ref = m(x)
    e, st = compile(m, x[:1], threads=threads, return_stages=True)
    fused = [op for op in e.spec["ops"] if "fused_block" in op]
    o = DEFAULT_OPTIONS
    thr = o.ochan_min_density if _ochan(o, st.plan.vec, e.spec["options"]["wide"]) else o.blocked_min_density
    ones = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1)]
    sparse = len(ones) == 2 and all(float((w != 0).sum()) < thr * w.numel() for w in ones)
    assert len(fused) == (1 if case.h * case.w <= 64 and sparse else 0), (case, [op["describe"] for op in e.spec["ops"]])
    out = e(x)
    err = float((out - ref).abs().max())
    assert err <= 1e-4 * float(ref.abs().max()) + 1e-6, (case, threads, err)
