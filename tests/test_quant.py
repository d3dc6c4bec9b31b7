"""int8 post-training quantization: the IR interpreter, the integer reference, calibration, QDQ export."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.engine.interpret import run_graph
from sparseforge.engine.plan import lower
from sparseforge.engine.quant import QParam, run_int
from sparseforge.engine.testing import random_network
from sparseforge.engine.trace import build_ir, trace


def _calibration(x: torch.Tensor, n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [x + 0.1 * torch.randn(x.shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("lowered", [False, True])
def test_interpreter_equals_the_model_on_generated_networks(lowered):
    for seed in range(25):
        model, x, desc = random_network(seed)
        with torch.no_grad():
            ref = model(x)
        g = build_ir(trace(model, x))
        out = run_graph(lower(g) if lowered else g, x)[0]
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-5), (seed, desc)


def test_ceil_mode_average_pools_in_both_references():
    """An average pool with ceil_mode (native since session 46) has clipped last windows: the float interpreter
    and the integer reference take PyTorch's output size and divisor (the window clipped to the padded map, or
    the pixels inside it); both ignored ceil_mode before (a wrong size)."""
    import torch.nn.functional as F

    for include_pad in (True, False):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

            def forward(self, x):
                return self.b(F.avg_pool2d(torch.relu(self.a(x)), 3, 2, 1, ceil_mode=True,
                                           count_include_pad=include_pad))

        torch.manual_seed(0)
        m, x = Net().eval(), torch.randn(2, 3, 8, 11)
        with torch.no_grad():
            ref = m(x)
        g = build_ir(trace(m, x[:1]))
        assert any(op.kind == "pool" and op.ceil_mode for op in g.ops)
        assert torch.allclose(run_graph(g, x)[0], ref, rtol=1e-5, atol=1e-6)
        qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), _calibration(x))
        assert float((qm(x) - ref).norm() / ref.norm()) < 0.05, include_pad


def test_int8_networks_stay_close_to_float_with_integers_in_range_and_pruned_weights_zero():
    errs = []
    for seed in range(20):
        model, x, desc = random_network(seed)
        qm = sf.quantize(model, sf.Int8Config(calibration="minmax"), _calibration(x))
        with torch.no_grad():
            ref = model(x)
        out = qm(x)
        errs.append(float((out - ref).norm() / (ref.norm() + 1e-9)))
        env = run_int(qm.qgraph, x, keep=True)
        for vid, t in env.items():
            if t.dtype == torch.int32:
                p = qm.qgraph.params[vid]
                assert int(t.min()) >= p.lo and int(t.max()) <= p.hi, (seed, vid)
        for op, q in zip(qm.qgraph.graph.ops, qm.qgraph.qops):
            w = getattr(op, "weight", None)
            if q.weight is not None and w is not None and w.shape == q.weight.shape:
                assert bool(((w == 0) <= (q.weight == 0)).all()), (seed, op.name)
    assert max(errs) < 0.15 and float(np.median(errs)) < 0.04, errs


def test_relu_outputs_are_uint8_and_relu_is_the_clamp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(),
                      nn.Linear(4 * 8 * 8, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), [x])
    g = qm.qgraph
    convs = [op for op in g.graph.ops if op.kind == "conv"]
    assert g.params[convs[0].output] == QParam(g.params[convs[0].output].scale, signed=False)
    assert g.params[convs[1].output].signed          # no ReLU: int8
    env = run_int(g, x, keep=True)
    assert int(env[convs[0].output].min()) == 0      # the clamp at 0 is the ReLU


def test_pruned_model_keeps_exact_zeros():
    torch.manual_seed(0)
    m = sf.create_model("resnet20")
    sf.prune(m, sf.PatternConfig(connectivity=2.0))
    m.eval()
    x = torch.randn(8, 3, 32, 32)
    qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), [x])
    checked = 0
    for op, q in zip(qm.qgraph.graph.ops, qm.qgraph.qops):
        if op.kind == "conv" and "mask" in op.folded:
            assert bool(((op.weight == 0) <= (q.weight == 0)).all()), op.name      # pruned -> exactly 0
            kept = op.weight != 0
            assert float((q.weight[kept] == 0).float().mean()) < 0.05, op.name    # kept weights mostly survive
            checked += 1
    assert checked >= 18


def test_float32_accumulation_equals_float64():
    """The fast path (float32 sums where no partial sum reaches 2^24) gives the same integers as float64."""
    model, x, _ = random_network(3)
    qm = sf.quantize(model, sf.Int8Config(calibration="minmax"), _calibration(x))
    assert any(q.exact32 for q in qm.qgraph.qops)
    fast = run_int(qm.qgraph, x, keep=True)
    for q in qm.qgraph.qops:
        q.exact32 = False
    slow = run_int(qm.qgraph, x, keep=True)
    assert all(torch.equal(fast[k], slow[k]) for k in fast)


def test_calibration_methods_and_auto_choice():
    torch.manual_seed(0)
    m = sf.create_model("resnet20").eval()
    x = torch.randn(16, 3, 32, 32)
    qs = {c: sf.quantize(m, sf.Int8Config(calibration=c, percentile=99.0), [x]) for c in ("minmax", "percentile", "mse")}
    s = {c: {v: p.scale for v, p in q.qgraph.params.items()} for c, q in qs.items()}
    assert all(s["percentile"][v] <= s["minmax"][v] + 1e-12 for v in s["minmax"])
    assert all(s["mse"][v] <= s["minmax"][v] + 1e-12 for v in s["minmax"])
    assert any(s["percentile"][v] < s["minmax"][v] for v in s["minmax"])
    auto = sf.quantize(m, sf.Int8Config(), [x])                       # no labels: closest outputs to float
    assert set(auto.qgraph.scores) == {"minmax", "percentile", "mse"}
    assert auto.qgraph.method == max(auto.qgraph.scores, key=auto.qgraph.scores.get)
    assert all(v <= 0 for v in auto.qgraph.scores.values())
    labelled = sf.quantize(m, sf.Int8Config(), [(x, torch.arange(16) % 10)])     # labels: accuracy
    assert all(0.0 <= v <= 1.0 for v in labelled.qgraph.scores.values())
    assert "calibration" in labelled.summary() and labelled.fallbacks == []


def test_post_training_int8_keeps_accuracy_of_a_trained_network():
    """Learning check: a small CNN trained on synthetic shapes loses at most 1 pt after int8."""
    from sparseforge.data import BatchLoader, synthetic_splits

    train, test = synthetic_splits(1200, 400, seed=5)
    torch.manual_seed(0)
    m = sf.create_model("smallcnn")
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(4):
        for xb, yb in BatchLoader(train, 64, shuffle=True, seed=epoch).iterate(epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(m(xb), yb).backward()
            opt.step()
    m.eval()
    xs, ys = next(iter(BatchLoader(test, 400).iterate(0)))
    with torch.no_grad():
        fp32 = float((m(xs).argmax(1) == ys).float().mean())
    assert fp32 > 0.6
    qm = sf.quantize(m, sf.Int8Config(), list(BatchLoader(train.subset(256), 64).iterate(0)))
    int8 = float((qm(xs).argmax(1) == ys).float().mean())
    assert int8 >= fp32 - 0.01, (fp32, int8)


def _ort_levels(ort) -> list:
    """onnxruntime optimisation levels whose results must equal the integer reference: with QDQ pairs kept as
    float ops (BASIC) on every host -- the export's semantics; fused into int8 kernels (ALL) only on CPUs with
    VNNI: without it onnxruntime's AVX2 u8s8 kernels sum pairs of products in saturating 16-bit lanes
    (measured on Zen 3: ResNet-20 logits off by 3.8% of their range, every op exact at BASIC)."""
    from sparseforge.hardware import cpu_flags
    levels = [ort.GraphOptimizationLevel.ORT_ENABLE_BASIC]
    if {"avx512_vnni", "avx_vnni"} & set(cpu_flags()):
        levels.append(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return levels


def _ort_session(ort, model, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def test_qdq_export_matches_the_integer_reference_op_by_op():
    ort = pytest.importorskip("onnxruntime")
    checked = 0
    for seed in range(15):
        model, x, _ = random_network(seed)
        qm = sf.quantize(model, sf.Int8Config(calibration="minmax"), _calibration(x))
        if qm.fallbacks:
            with pytest.raises(sf.SparseforgeError, match="no ONNX QDQ form"):
                sf.export_qdq(qm)
            continue
        env = run_int(qm.qgraph, x, keep=True)
        onnx = sf.export_qdq(qm, debug_outputs=True, feed_values=True)
        for level in _ort_levels(ort):
            s = _ort_session(ort, onnx, level)
            feeds = {"input": x.numpy()}
            for i in s.get_inputs()[1:]:
                vid = int(i.name[2:])
                feeds[i.name] = (env[vid].float() * qm.qgraph.params[vid].scale).numpy()
            for o, val in zip(s.get_outputs(), s.run(None, feeds)):
                vid = int(o.name[1:])
                ref = env[vid]
                if ref.dtype == torch.float32:            # logits from the accumulator
                    assert np.abs(val - ref.numpy()).max() <= 1e-5 * (np.abs(ref.numpy()).max() + 1), seed
                else:                                     # within one step (a tie rounded the other way)
                    err = np.abs(val / qm.qgraph.params[vid].scale - ref.numpy()).max()
                    assert err <= 1.0 + 1e-3, (seed, vid, level)
        checked += 1
    assert checked >= 8


def test_qdq_export_of_resnet20_runs_end_to_end_like_the_reference(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = sf.create_model("resnet20").eval()
    x = torch.randn(4, 3, 32, 32)
    qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), [torch.randn(16, 3, 32, 32)])
    path = tmp_path / "r20-int8.onnx"
    sf.export_qdq(qm, path)
    ref = qm(x).numpy()
    for level in _ort_levels(ort):
        out = _ort_session(ort, str(path), level).run(None, {"input": x.numpy()})[0]
        assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max(), level


def test_bad_inputs_are_one_line_errors():
    m = sf.create_model("smallcnn").eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(sf.SparseforgeError, match="calibration"):
        sf.quantize(m, sf.Int8Config())
    with pytest.raises(sf.SparseforgeError, match="calibration yielded no batches"):
        sf.quantize(m, sf.Int8Config(), [])
    with pytest.raises(sf.SparseforgeError, match="NCHW"):
        sf.quantize(m, sf.Int8Config(), [torch.randn(3, 32, 32)])
    with pytest.raises(sf.SparseforgeError, match="Int8Config"):
        sf.quantize(m, sf.PatternConfig(), [x])
    with pytest.raises(sf.SparseforgeError):
        sf.Int8Config(calibration="entropy")
    qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), [x])
    with pytest.raises(sf.SparseforgeError, match="quantized for inputs of shape"):
        qm(torch.randn(1, 3, 16, 16))
    with pytest.raises(sf.SparseforgeError, match="quantized for inputs of shape"):
        sf.compile(qm, torch.randn(1, 3, 16, 16))
    with pytest.raises(sf.SparseforgeError, match="fp32-engine options"):
        sf.compile(qm, x, conv_mode="direct")
    e = sf.compile(qm, x, threads=1)           # the int8 engine, bit-exact with the integer reference
    assert torch.equal(e(x), qm(x)) and "int8 engine:" in e.summary()


def test_nan_input_counts_as_zero():
    m = sf.create_model("smallcnn").eval()
    x = torch.randn(2, 3, 32, 32)
    qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), [x])
    xn = x.clone()
    xn[0, 0, 3, 3] = float("nan")
    x0 = x.clone()
    x0[0, 0, 3, 3] = 0.0
    assert torch.equal(qm(xn), qm(x0))


def _skip_without_avx2(isa: str) -> None:
    from sparseforge.engine.build import AVX2_NEEDS
    from sparseforge.hardware import all_cpu_flags

    if isa == "avx2" and not set(AVX2_NEEDS) <= set(all_cpu_flags()):
        pytest.skip("this CPU cannot run AVX2 code")


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
def test_int8_engine_convs_equal_the_integer_reference_on_generated_networks(isa):
    """The int8 engine (tap-quad conv kernel: AVX512-VNNI where the CPU has it, AVX2 (byte pairs into int16,
    entries that could saturate split), plain C in the portable build; the other native ops: depthwise, pools,
    global pool, linear, add, multiply, tables, flatten, concat) gives the integer reference's integers exactly for
    every op it runs: signed and unsigned inputs, strides 1 and 2, 1x1 and kxk, residual epilogues, batch > 1, 1
    and 2 threads; ops it does not cover run through the reference and are listed."""
    from sparseforge.engine.int8 import Int8Engine

    _skip_without_avx2(isa)
    native, others = 0, set()
    seeds = {"native": range(40, 52), "avx2": range(52, 60), "portable": range(60, 64)}[isa]
    for seed in seeds:
        model, x, desc = random_network(seed)
        qm = sf.quantize(model, sf.Int8Config(calibration="minmax"), _calibration(x))
        e = Int8Engine(qm, threads=1 + seed % 2, isa=isa)
        assert e.kernel == {"avx2": "AVX2", "portable": "plain C"}.get(isa, e.kernel)
        env_ref, env = run_int(qm.qgraph, x, keep=True), e.run(x, keep=True)
        for k in e.native:
            v = qm.qgraph.graph.ops[k].output
            assert torch.equal(env[v], env_ref[v]), (seed, qm.qgraph.graph.ops[k].name, desc)
        out = e(x)
        assert torch.equal(out, qm(x)), (seed, desc)
        native += len(e.plans)
        others |= {nat.what.split(" (")[0] for k, nat in e.native.items() if k not in e.plans}
        s = e.summary()
        assert s.count("int8 kernel (") == len(e.plans)
        assert s.count("reference (") == len(qm.qgraph.graph.ops) - len(e.native)
    assert native >= 2 * len(seeds)
    if isa == "native":       # the other native ops were exercised too
        assert {"int8 add", "int8 global pool", "int8 linear", "int8 depthwise"} <= others, others


def test_avx2_pair_splitting_keeps_every_sum_and_bounds_every_pair():
    """AVX2's vpmaddubsw adds two byte products into int16 with saturation: 255 * (127 + 127) would clip. Split
    entries keep each filter's sum per (quad, byte) and leave no same-sign pair above 128 in magnitude."""
    from sparseforge.engine.int8 import choose_pairings, split_pairs

    g = np.random.default_rng(0)
    w = g.integers(-127, 128, size=(500, 4)).astype(np.int8)
    w[:50] = 127
    eq = g.integers(0, 40, size=500).astype(np.int32)
    fbeg = np.array([0, 120, 120, 333, 500])
    eq2, ew2, fb2 = split_pairs(eq, w.view(np.int32).reshape(-1), fbeg)
    b = ew2.view(np.int8).reshape(-1, 4).astype(np.int64)
    assert len(eq2) > len(eq) and fb2[0] == 0 and fb2[-1] == len(eq2)
    for j in (0, 2):
        same = b[:, j] * b[:, j + 1] > 0
        assert not (same & (np.abs(b[:, j]) + np.abs(b[:, j + 1]) > 128)).any()
    # choosing each quad's byte pairing keeps every entry's (offset, weight) products and needs fewer splits
    qoff = g.integers(0, 1000, size=(40, 4)).astype(np.int32)
    qoff2, ew3 = choose_pairings(qoff, eq, w.view(np.int32).reshape(-1))
    b3 = ew3.view(np.int8).reshape(-1, 4)
    for e in range(500):
        assert sorted(zip(qoff[eq[e]], w[e])) == sorted(zip(qoff2[eq[e]], b3[e]))
    assert len(split_pairs(eq, ew3, fbeg)[0]) < len(eq2)
    for f in range(4):
        before = np.zeros((40, 4), np.int64)
        np.add.at(before, eq[fbeg[f]:fbeg[f + 1]], w[fbeg[f]:fbeg[f + 1]].astype(np.int64))
        after = np.zeros((40, 4), np.int64)
        np.add.at(after, eq2[fb2[f]:fb2[f + 1]], b[fb2[f]:fb2[f + 1]])
        assert np.array_equal(before, after)


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_int8_engine_is_exact_where_byte_pairs_would_saturate_int16(isa):
    """Weights at +-127 everywhere and inputs at 255: every quad's pairs reach 2 * 255 * 127 = 64770."""
    from sparseforge.engine.int8 import Int8Engine

    _skip_without_avx2(isa)
    m = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten()).eval()
    with torch.no_grad():
        m[1].weight.copy_(torch.sign(torch.randn(m[1].weight.shape, generator=torch.Generator().manual_seed(0))))
        m[1].weight[:2] = 1.0
        m[3].weight.fill_(-1.0)
    x = torch.full((2, 8, 6, 6), 3.0)
    x[1, :, ::2] = 0.0
    qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), [x])
    e = Int8Engine(qm, threads=2, isa=isa)
    assert len(e.plans) == 2
    assert torch.equal(e(x), qm(x))


def test_int8_engine_tiny_maps_in_narrow_quads_are_exact():
    """Maps whose run covers at most 8 positions (flat positions include the junk columns: 2x2 runs 6, 2x3 8, 3x1
    7, 1x1 and 1x4 at most 4; 3x2 runs 10 and stays 16-lane) run their quads in xmm / ymm vectors on VNNI hosts,
    with residual adds, dense layers (filter pairs sharing quads), 1 and 2 threads, batch 1 and 3: the integers
    are the reference's and the 16-lane path's."""
    from sparseforge.engine.int8 import Int8Engine

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(6, 24, 3, padding=1)
            self.b = nn.Conv2d(24, 24, 3, padding=1)
            self.c = nn.Conv2d(24, 24, 3, padding=1)
            self.d = nn.Conv2d(24, 10, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.d(torch.relu(self.c(torch.relu(self.b(y))) + y))

    for hw, pattern, narrow in (((2, 2), True, True), ((1, 1), False, True), ((2, 3), True, True),
                                ((3, 1), False, True), ((1, 4), True, True), ((3, 2), True, False)):
        torch.manual_seed(hw[0] * 10 + hw[1])
        m = Net().eval()
        if pattern:
            sf.prune(m, sf.PatternConfig(num_patterns=8, connectivity=2.0, prune_first_conv=True))
        for batch in (1, 3):
            x = torch.randn(batch, 6, *hw)
            qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), _calibration(x))
            for threads in (1, 2):
                e, e16 = Int8Engine(qm, threads=threads), Int8Engine(qm, threads=threads, narrow_tiles=False)
                env_ref, env, env16 = run_int(qm.qgraph, x, keep=True), e.run(x, keep=True), e16.run(x, keep=True)
                for k in e.plans:
                    v = qm.qgraph.graph.ops[k].output
                    assert torch.equal(env[v], env_ref[v]) and torch.equal(env16[v], env_ref[v]), (hw, batch, threads)
                if e.kernel == "AVX512-VNNI":
                    assert sum("-lane quads" in e.native[k].what for k in e.plans) == narrow * len(e.plans), e.summary()
                    assert not any("-lane quads" in e16.native[k].what for k in e16.plans)


def test_int8_engine_scratch_and_planes_are_cache_line_aligned():
    """numpy aligns to 16 bytes: a packed quad vector at 16 mod 64 is two halves of two cache lines (CIFAR VGG-16
    8x ran 1.27x slower in such a process). Every engine's scratch and byte planes start on a 64-byte line."""
    from sparseforge.engine.int8 import Int8Engine

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 5, 7)
    qm = sf.quantize(m, sf.Int8Config(calibration="minmax"), [x])
    for threads in (1, 2, 3):
        e = Int8Engine(qm, threads=threads)
        assert torch.equal(e(x), qm(x))
        assert e._Q.ctypes.data % 64 == 0 and e._Q.size >= e._qstride * threads
        for n in (1, 2):
            arrs = [a for a in e._buffers(n)[0] if a is not None]
            assert arrs and all(a.ctypes.data % 64 == 0 for a in arrs)


def test_int8_engine_quantizes_its_input_like_the_reference():
    """The engine quantizes the float input in C: NaN as 0, +-inf and huge values clamped, exact halves rounded to
    even, signed and unsigned inputs, batches of 1-3, one-row maps -- the reference's bytes."""
    from sparseforge.engine.int8 import Int8Engine
    from sparseforge.engine.quant import quantize_input

    g = torch.Generator().manual_seed(0)
    signs = set()
    for model, shape in ((nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), (2, 3, 5, 6)),
                         (nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1)), (1, 3, 4, 4)),
                         (nn.Sequential(nn.Conv2d(2, 4, 1), nn.Flatten(), nn.Linear(4 * 9, 3)), (3, 2, 1, 9))):
        model = model.eval()
        x = torch.randn(shape, generator=g)
        if shape[0] == 3:
            x = x.abs()                  # a non-negative input: unsigned bytes
        qm = sf.quantize(model, sf.Int8Config(calibration="minmax"), [x])
        gin = qm.qgraph.graph.inputs[0]
        signs.add(qm.qgraph.params[gin].signed)
        p = qm.qgraph.params[gin]
        flat = x.reshape(-1)
        flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 0.0])
        flat[6:12] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 7.5]) * p.scale   # ties, where the division is exact
        e = Int8Engine(qm, threads=1)
        env = e.run(x, keep=True)
        assert torch.equal(env[gin].to(torch.int32), quantize_input(x, p)), (shape, p.signed)
    assert signs == {True, False}


def test_int8_engine_split_quads_are_exact():
    """A map of one tile on several threads splits its quads: each thread packs its share and sums every filter's
    entries on it, then adds the threads' partials for its own filters. 2 and 3 threads, batches whose leftover
    images run split (5 on 3 threads, 3 on 2), residuals, dense layers, narrow maps: the reference's integers."""
    from sparseforge.engine.int8 import Int8Engine, split_quads

    n_split = 0
    for seed in (3, 17, 21, 40, 44, 45):
        model, x, desc = random_network(seed)
        qm = sf.quantize(model, sf.Int8Config(calibration="minmax"), _calibration(x))
        for threads in (2, 3):
            xb = torch.cat([x] * 5)[:3 if threads == 2 else 5]
            e = Int8Engine(qm, threads=threads, split_quads_min=1)
            env_ref, env = run_int(qm.qgraph, xb, keep=True), e.run(xb, keep=True)
            for k in e.native:
                v = qm.qgraph.graph.ops[k].output
                assert torch.equal(env[v], env_ref[v]), (seed, threads, qm.qgraph.graph.ops[k].name, desc)
            n_split += sum("quads split" in e.native[k].what for k in e.plans)
    if Int8Engine(qm, threads=2, split_quads_min=1).kernel == "AVX512-VNNI":
        assert n_split >= 6
    # the split's bookkeeping: quad ranges cover every quad once; each filter's entries are sorted by quad and
    # its bounds cut them at the ranges; a filter's sum per quad is unchanged
    model, x, _ = random_network(5)
    qm = sf.quantize(model, sf.Int8Config(calibration="minmax"), _calibration(x))
    e = Int8Engine(qm, threads=1)
    for p in e.plans.values():
        before = [sorted(zip(p.eq[b:f].tolist(), p.ew[b:f].tolist())) for b, f in zip(p.fbeg[:-1], p.fbeg[1:])]
        qs = split_quads(p, 3)
        qsb, fsp = qs[:4], qs[4:].reshape(-1, 4)
        assert qsb[0] == 0 and qsb[-1] == p.quads and (np.diff(qsb) >= 0).all()
        for f, (b, end) in enumerate(zip(p.fbeg[:-1], p.fbeg[1:])):
            assert (np.diff(p.eq[b:end]) >= 0).all() and fsp[f, 0] == b and fsp[f, -1] == end
            for t in range(3):
                assert ((p.eq[fsp[f, t]:fsp[f, t + 1]] >= qsb[t]) & (p.eq[fsp[f, t]:fsp[f, t + 1]] < qsb[t + 1])).all()
            assert sorted(zip(p.eq[b:end].tolist(), p.ew[b:end].tolist())) == before[f]


def test_int8_engine_serves_concurrent_callers_one_at_a_time():
    """Two Python threads calling one int8 engine each get their own exact answer (the engine's byte planes are
    shared: without the engine's lock they overwrote each other silently)."""
    import threading

    from sparseforge.engine.int8 import Int8Engine

    model, x, _ = random_network(41)
    qm = sf.quantize(model, sf.Int8Config(calibration="minmax"), _calibration(x))
    e = Int8Engine(qm, threads=2)
    xs = [x + 0.5 * i for i in range(4)]
    refs = [qm(t) for t in xs]
    bad: list[int] = []

    def caller(i: int) -> None:
        for _ in range(15):
            if not torch.equal(e(xs[i]), refs[i]):
                bad.append(i)

    ts = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not bad
