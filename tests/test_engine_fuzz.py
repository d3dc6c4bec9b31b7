"""Property-based fuzzing of the compiler: random single layers and small blocks vs PyTorch.

Tolerance: max |engine - torch| <= 1e-4 * max |torch| (+1e-6 absolute for all-zero outputs).
300 cases here; bench/engine_fuzz.py runs 3000.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseforge.engine import compile
from sparseforge.engine.testing import Case, build_case, valid
from sparseforge.report.env import cpu_flags

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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(cases, st.sampled_from(WIDTHS), st.sampled_from(["auto", "gather", "direct"]))
def test_compiled_block_matches_pytorch(case, width, mode):
    m, x = build_case(case)
    with torch.inference_mode():
        ref = m(x)
    e = compile(m, x[:1], threads=2, vector_width=width, conv_mode=mode)
    out = e(x)
    err = float((out - ref).abs().max())
    assert err <= 1e-4 * float(ref.abs().max()) + 1e-6, (case, width, mode, err)
