"""The plan cache: a second compile of the same graph skips planning and code generation; any change to what
planning reads (a weight, the input shape, an option) misses; a damaged entry is rebuilt, never trusted."""

import pytest
import torch
import torch.nn as nn

from engine_util import randomize_bn
from sparseforge.engine import compile


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path / "cache"))


def _net():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(8, 4)))


def test_second_compile_reuses_the_plan_and_agrees():
    m, x = _net(), torch.randn(2, 3, 12, 12)
    a = compile(m, x[:1], threads=2)
    b = compile(m, x[:1], threads=2)
    assert not a.spec["build"]["plan_cached"] and b.spec["build"]["plan_cached"]
    assert "plan" not in b.stages.seconds
    assert b.source == a.source
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("change", ["weight", "input_shape", "threads", "bn", "plan_options"])
def test_anything_planning_reads_misses_the_cache(change):
    m, x = _net(), torch.randn(1, 3, 12, 12)
    compile(m, x, threads=2)
    if change == "weight":
        with torch.no_grad():
            m[0].weight[0, 0, 0, 0] += 1e-3
    elif change == "bn":
        m[1].running_var[3] += 0.5
    if change == "input_shape":
        x = torch.randn(1, 3, 14, 12)
    from sparseforge.engine import PlanOptions

    opts = PlanOptions(max_acc=8) if change == "plan_options" else None
    e = compile(m, x, threads=3 if change == "threads" else 2, plan_options=opts)
    assert not e.spec["build"]["plan_cached"]
    with torch.inference_mode():
        assert torch.allclose(e(x), m(x), rtol=1e-4, atol=1e-5)


def test_damaged_entry_is_rebuilt(tmp_path):
    m, x = _net(), torch.randn(1, 3, 12, 12)
    compile(m, x, threads=2)
    entries = list((tmp_path / "cache" / "plans").glob("*/blobs.bin"))
    assert len(entries) == 1
    data = bytearray(entries[0].read_bytes())
    data[len(data) // 2] ^= 0xFF            # one flipped byte in the weights
    entries[0].write_bytes(bytes(data))
    e = compile(m, x, threads=2)
    assert not e.spec["build"]["plan_cached"]
    with torch.inference_mode():
        assert torch.allclose(e(x), m(x), rtol=1e-4, atol=1e-5)
    assert compile(m, x, threads=2).spec["build"]["plan_cached"]     # and the rebuilt entry is good again


def test_plan_options_travel_with_the_artefact(tmp_path):
    """Tuning knobs are a value passed in: recorded in the spec, saved with the artefact, replanned the same on load."""
    from sparseforge.engine import PlanOptions, load_engine
    from sparseforge.errors import SparseforgeError

    m, x = _net(), torch.randn(1, 3, 12, 12)
    opts = PlanOptions(max_acc=4, blocked_min_density=1.01, ochan_min_density=1.01)    # sparse modes, 4 accumulators
    e = compile(m, x, threads=2, plan_options=opts)
    assert e.spec["options"]["plan"]["max_acc"] == 4
    assert e.source != compile(m, x, threads=2).source
    e.save(tmp_path / "eng")
    back = load_engine(tmp_path / "eng")
    assert back.source == e.source
    with torch.inference_mode():
        assert torch.equal(back(x), e(x)) and torch.allclose(e(x), m(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(SparseforgeError, match="PlanOptions"):
        compile(m, x, plan_options={"max_acc": 4})
