"""Compiled engine vs PyTorch: numerical equality (tolerance 1e-4 relative to max |output|), artefacts, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.engine import compile, load_engine
from sparseforge.engine.plan import PlanOptions
from sparseforge.errors import SparseforgeError
from engine_util import randomize_bn, rel_err

TOL = 1e-4
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _model(name):
    torch.manual_seed(0)
    return randomize_bn(sf.create_model(name))


SPARSITIES = {
    "dense": None,
    "pattern": sf.PatternConfig(num_patterns=8, connectivity=1.0),
    "pattern8x": sf.PatternConfig(num_patterns=8, connectivity=3.6),
    "pattern8x-cb2": sf.PatternConfig(num_patterns=4, connectivity=3.6, channel_block=2),
    "magnitude90": sf.MagnitudeConfig(sparsity=0.9),
}


@pytest.mark.parametrize("name,sparsity", [
    ("resnet20", "dense"), ("resnet20", "pattern"), ("resnet20", "pattern8x"), ("resnet20", "pattern8x-cb2"),
    ("resnet20", "magnitude90"), ("resnet56", "pattern8x"), pytest.param("vgg16", "pattern", marks=pytest.mark.slow),
    ("vgg16", "pattern8x"), pytest.param("mobilenetv2", "dense", marks=pytest.mark.slow),
    pytest.param("mobilenetv2", "pattern8x", marks=pytest.mark.slow),      # 15-25 s of gcc; the fuzz covers its blocks
])
def test_engine_matches_pytorch(name, sparsity):
    m = _model(name)
    if SPARSITIES[sparsity] is not None:
        sf.prune(m, SPARSITIES[sparsity])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    training = m.training
    engine = compile(m, torch.randn(1, 3, 32, 32), threads=2)
    assert all(op["native"] for op in engine.spec["ops"]), engine.summary(profile=False)
    if name == "mobilenetv2":
        # its 8x8 and 4x4 inverted-residual blocks run fused (expand -> dw -> project in one pass) only when both
        # 1x1 convs are sparse; dense 1x1 convs run faster layer by layer in blocked mode (any ISA's threshold)
        fused = sum("fused_block" in op for op in engine.spec["ops"])
        assert fused == (0 if sparsity == "dense" else 9), (fused, engine.summary(profile=False))
    for batch in (1, 8):
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            ref = m(x)
        assert rel_err(engine(x), ref) <= TOL
    # the model itself is untouched by compilation (weights, BN statistics, train/eval mode)
    assert m.training == training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_fallback_is_correct_and_visible():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.conv5 = nn.Conv2d(8, 8, 5, padding=2)        # 5x5: no native kernel
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            z = torch.sigmoid(self.conv5(y))                    # sigmoid: fallback too
            z = torch.fmod(self.conv2(z), 0.7)                  # fmod: fallback
            return self.head(z.mean((2, 3)))

    m = randomize_bn(Odd())
    e = compile(m, torch.randn(1, 3, 12, 10), threads=2)
    s = e.summary(profile=False)
    assert "PyTorch" in s and "generated" in s
    x = torch.randn(3, 3, 12, 10)
    assert rel_err(e(x), m(x)) <= TOL
    assert e._fast[3] is None, "an engine with fallbacks must take the general path"
    # network-order profile: every op timed (native and fallback), per-thread work for native ops only,
    # and the traced forward computes the same result as the plain one
    prof = e.profile(batch=2, reps=3, mode="network")
    assert sorted(prof) == list(range(len(e.spec["ops"]))) and all(t > 0 for t in prof.values())
    for k, op in enumerate(e.spec["ops"]):
        w = e.profile_detail[k]["work_s_per_thread"]
        assert (w is not None and len(w) == 2 and all(v >= 0 for v in w)) if op["native"] else w is None
    assert torch.equal(e.traced(x)[0], e(x))
    with pytest.raises(SparseforgeError, match="'isolated' or 'network'"):
        e.profile(mode="hot")


def test_input_errors():
    e = compile(_model("resnet20"), torch.randn(1, 3, 32, 32), threads=1)
    with pytest.raises(SparseforgeError, match=r"shape \(N, 3, 32, 32\)"):
        e(torch.randn(1, 3, 30, 32))
    with pytest.raises(SparseforgeError, match="float32"):
        e(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(SparseforgeError, match="torch.Tensor"):
        e([[1.0]])


def test_direct_call_path_equals_general_path():
    """A plain call goes straight to the C segments; it must return what the general path (input checks, every
    value's view, fallbacks) returns, bit for bit, for any batch, memory format and autograd state of the input,
    and must not hand back a view of the engine's own buffers; bad input still gets the general path's errors."""
    m = _model("resnet20")
    sf.prune(m, SPARSITIES["pattern8x"])
    e = compile(m, torch.randn(1, 3, 32, 32), threads=2)
    g = torch.Generator().manual_seed(3)
    for n in (1, 3, 1):
        x = torch.randn(n, 3, 32, 32, generator=g)
        for xi in (x, x.contiguous(memory_format=torch.channels_last), x.clone().requires_grad_()):
            y = e(xi)
            assert e._fast.get(n), "the direct path was not taken"
            assert torch.equal(y, e._run(xi))
    y1, ref = e(x), e._run(x)
    e(x + 1.0)                                   # a later call must not change an earlier result
    assert torch.equal(y1, ref)
    with pytest.raises(SparseforgeError, match=r"shape \(N, 3, 32, 32\)"):
        e(torch.randn(1, 3, 32))
    with pytest.raises(SparseforgeError, match="empty batch"):
        e(torch.randn(0, 3, 32, 32))


def test_save_load_round_trip_and_tamper(tmp_path):
    m = _model("resnet20")
    sf.prune(m, SPARSITIES["pattern8x"])
    e = compile(m, torch.randn(1, 3, 32, 32), threads=2)
    e.save(tmp_path / "eng")
    with pytest.raises(SparseforgeError, match="not empty"):
        e.save(tmp_path / "eng")
    e2 = load_engine(tmp_path / "eng")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(e(x), e2(x))
    assert not list((tmp_path / "eng").glob("*.so")), "an artefact holds data only, no binary"
    # modified weights
    blob = tmp_path / "eng" / "graph.safetensors"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(SparseforgeError, match="modified"):
        load_engine(tmp_path / "eng")


def _rehash(eng_dir, extra_files=()):
    """What an attacker who can write the artefact does: recompute every hash so the manifest checks pass."""
    from sparseforge.engine.artefact import _manifest_hash
    from sparseforge.utils import sha256_file

    mf = eng_dir / "manifest.json"
    man = json.loads(mf.read_text())
    for f in list(man["files"]) + list(extra_files):
        man["files"][f] = sha256_file(eng_dir / f)
    man["manifest_sha256"] = _manifest_hash(man)
    mf.write_text(json.dumps(man))


def _evil_library(path, marker):
    """A shared library whose constructor writes ``marker`` the moment it is loaded."""
    src = Path(marker).with_name("evil.c")
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void pwn(void) '
                   f'{{ FILE* f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }} }}\n'
                   'void run_op0(void) {}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(path)], check=True)


def test_artefact_binary_is_never_loaded(tmp_path):
    """A library planted in an artefact (hashes recomputed) never runs; an edited source is refused, not built."""
    m = _model("resnet20")
    sf.prune(m, SPARSITIES["pattern8x"])
    e = compile(m, torch.randn(1, 3, 32, 32), threads=2)
    eng = tmp_path / "eng"
    e.save(eng)
    marker = tmp_path / "marker"
    _evil_library(eng / "kernel.so", marker)
    _rehash(eng, extra_files=("kernel.so",))
    e2 = load_engine(eng)
    assert not marker.exists()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(e2(x), e(x))
    assert Path(e2.lib_path).resolve().parent != eng.resolve()
    # the source edited to run code, hashes recomputed: regenerated from the graph, it differs -> refused
    src = (eng / "kernel.c").read_text()
    (eng / "kernel.c").write_text(src + f'\n__attribute__((constructor)) static void pwn(void) {{ '
                                  f'FILE* f = fopen("{marker}", "w"); }}\n')
    _rehash(eng)
    with pytest.raises(SparseforgeError, match="regenerated"):
        load_engine(eng)
    assert not marker.exists()
    # an old-format artefact that ships a library: refused before anything is opened
    mf = eng / "manifest.json"
    man = json.loads(mf.read_text())
    man["format"] = "sparseforge-engine-artefact-1"
    mf.write_text(json.dumps(man))
    with pytest.raises(SparseforgeError, match="no\\s+longer loads|longer loads"):
        load_engine(eng)
    assert not marker.exists()


def test_native_builds_are_cached_per_cpu(monkeypatch):
    """-march=native code is the building CPU's: another CPU (a shared cache) gets its own entry, never that
    library (it would die of SIGILL on load); portable builds are the same everywhere and share one."""
    import sparseforge.engine.build as B

    src = "int f(void) { return 1; }"
    cc = B.compiler()
    native, portable = B.build_key(src, B.NATIVE_FLAGS, cc), B.build_key(src, B.PORTABLE_FLAGS, cc)
    monkeypatch.setattr(B, "cpu_flags", lambda: ["avx", "avx2", "fma"])       # an AVX2-only CPU
    assert B.build_key(src, B.NATIVE_FLAGS, cc) != native
    assert B.build_key(src, B.PORTABLE_FLAGS, cc) == portable


def test_damaged_build_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    """A truncated or replaced kernel.so in the build cache is rebuilt, never loaded (it used to SIGBUS)."""
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path / "cache"))
    m = _model("smallcnn")          # the cache logic does not depend on the network: the smallest that is pruned
    sf.prune(m, SPARSITIES["pattern8x"])
    x = torch.randn(2, 3, 32, 32)
    e = compile(m, x[:1], threads=2)
    ref = e(x)
    lib = Path(e.lib_path)
    del e
    marker = tmp_path / "marker"
    for damage in ("truncate", "replace"):
        if damage == "truncate":
            data = lib.read_bytes()
            lib.unlink()               # a new inode: the loaded copy stays mapped
            lib.write_bytes(data[:1000])
        else:
            lib.unlink()
            _evil_library(lib, marker)
        e2 = compile(m, x[:1], threads=2)
        assert e2.spec["build"]["cached"] is False
        assert Path(e2.lib_path) == lib and not marker.exists()
        assert torch.equal(e2(x), ref)


def test_damaged_manifest_is_one_line_error(tmp_path):
    """A manifest that is not JSON, not an object, or lacks its format or file hashes (re-hashed, so only the
    content is wrong): one SparseforgeError line naming the file, nothing built or loaded."""
    import shutil

    from sparseforge.engine.artefact import _manifest_hash

    e = compile(_model("resnet20"), torch.randn(1, 3, 32, 32), threads=1)
    e.save(tmp_path / "eng")
    man = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    cases = {"nonjson": "{not json", "list": "[1, 2]", "string": '"engine"', "empty": "{}"}
    for key in ("format", "files"):
        m = {k: v for k, v in man.items() if k != key}
        m["manifest_sha256"] = _manifest_hash(m)
        cases[f"no-{key}"] = json.dumps(m)
    for name, text in cases.items():
        d = tmp_path / name
        shutil.copytree(tmp_path / "eng", d)
        (d / "manifest.json").write_text(text)
        with pytest.raises(SparseforgeError) as ei:
            load_engine(d)
        msg = str(ei.value)
        assert "\n" not in msg and str(d) in msg, (name, msg)


def test_load_refuses_missing_cpu_features(tmp_path):
    from sparseforge.engine.artefact import _manifest_hash

    e = compile(_model("resnet20"), torch.randn(1, 3, 32, 32), threads=1)
    e.save(tmp_path / "eng")
    mf = tmp_path / "eng" / "manifest.json"
    man = json.loads(mf.read_text())
    man["cpu_flags_required"] = sorted(set(man["cpu_flags_required"]) | {"avx9000"})
    man["manifest_sha256"] = _manifest_hash(man)
    mf.write_text(json.dumps(man))
    with pytest.raises(SparseforgeError, match="CPU features this machine lacks.*avx9000"):
        load_engine(tmp_path / "eng")
    man["threads"] = 7   # edited without re-hashing
    mf.write_text(json.dumps(man))
    with pytest.raises(SparseforgeError, match="tampered"):
        load_engine(tmp_path / "eng")


def test_concurrent_compiles_share_one_cache_entry(tmp_path):
    env = {**os.environ, "SPARSEFORGE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(HERE.parent / "src")}
    code = ("import torch, sparseforge as sf; torch.manual_seed(0); m = sf.create_model('smallcnn').eval();"
            "sf.prune(m, sf.PatternConfig(connectivity=3.6)); e = sf.compile(m, torch.randn(1, 3, 32, 32), threads=2);"
            "print(e(torch.ones(1, 3, 32, 32)).sum().item())")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert outs[0][0] == outs[1][0]
    entries = [d for d in (tmp_path / "cache" / "engine").iterdir() if d.is_dir()]
    assert len(entries) == 1
    assert not list(entries[0].glob("*.tmp"))


def test_cached_compile_reuses_library():
    m = _model("resnet20")
    e1, st1 = compile(m, torch.randn(1, 3, 32, 32), threads=2, return_stages=True)
    e2, st2 = compile(m, torch.randn(1, 3, 32, 32), threads=2, return_stages=True)
    assert st2.build_info["cached"] and st1.build_info["key"] == st2.build_info["key"]


def test_snapshot_of_generated_source(monkeypatch):
    """Pins the generated C of one small layer; regenerate with UPDATE_SNAPSHOTS=1 after an intended change.
    The one host fact in the source (how this host's PyTorch takes GELU of +Inf) is fixed to AVX-512's."""
    from sparseforge.engine import codegen
    monkeypatch.setattr(codegen, "torch_gelu_inf_is_nan", lambda: True)
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(54, dtype=torch.float32).reshape(3, 2, 3, 3) / 10 - 2.0)
        conv.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    sf.prune(nn.Sequential(nn.Conv2d(1, 1, 1), conv), sf.PatternConfig(num_patterns=4, library="pconv"))
    m = nn.Sequential(conv, nn.ReLU()).eval()
    _, st = compile(m, torch.randn(1, 2, 5, 6), threads=2, return_stages=True)
    snap = HERE / "snapshots" / "conv3x3_pattern_relu.c"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        snap.write_text(st.source)
    assert snap.exists(), f"{snap} missing: run with UPDATE_SNAPSHOTS=1 once and commit it"
    assert st.source == snap.read_text(), "generated source changed; check the diff and run with UPDATE_SNAPSHOTS=1"
    x = torch.randn(2, 2, 5, 6)
    assert rel_err(st and compile(m, torch.randn(1, 2, 5, 6), threads=2)(x), m(x)) <= TOL


def test_snapshot_of_gather_and_resize_templates():
    """Pins the generated C of the channel-gather and resize templates (a chunk of a shuffle, nearest and
    bilinear); regenerate with UPDATE_SNAPSHOTS=1 after an intended change."""
    import re

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.size()
            y1, y2 = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, -1, h, w).chunk(2, 1)
            return self.b(torch.cat((nn.functional.interpolate(y1, scale_factor=2, mode="nearest"),
                                     nn.functional.interpolate(y2, size=(10, 8), mode="bilinear")), 1))

    _, st = compile(Net().eval(), torch.randn(1, 2, 5, 4), threads=2, return_stages=True)
    kinds = {k: op.kind for k, op in enumerate(st.plan.graph.ops)}
    picked = [k for k, kind in kinds.items() if kind in ("gather", "resize")]
    assert sorted(kinds[k] for k in picked) == ["gather", "gather", "resize", "resize"]
    text = "\n".join(re.search(rf"static void op{k}\(OPARGS\) \{{.*?\n\}}\n", st.source, re.S).group(0)
                     for k in picked)
    snap = HERE / "snapshots" / "gather_resize_ops.c"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        snap.write_text(text)
    assert snap.exists(), f"{snap} missing: run with UPDATE_SNAPSHOTS=1 once and commit it"
    assert text == snap.read_text(), "generated source changed; check the diff and run with UPDATE_SNAPSHOTS=1"


def test_cli_compile_and_bench(tmp_path, capsys):
    from sparseforge.cli import main
    from sparseforge.models import save_weights

    m = _model("resnet20")
    sf.prune(m, SPARSITIES["pattern8x"])
    save_weights(m, tmp_path / "w.safetensors")
    assert main(["compile", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "eng"), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "21/21 ops generated" in out and "engine:" in out
    e = load_engine(tmp_path / "eng")
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(e(x), m.eval()(x)) <= TOL
    assert main(["bench", str(tmp_path / "w.safetensors"), "--runs", "5", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["arms"]["sparseforge"]["runs"] == 5


def test_channels_last_model_compiles_correctly():
    """Training defaults to channels_last; a model in that memory format must compile to the same function."""
    m = _model("resnet20")
    sf.prune(m, SPARSITIES["pattern8x"])
    m = m.to(memory_format=torch.channels_last)
    e = compile(m, torch.randn(1, 3, 32, 32), threads=2)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert rel_err(e(x.contiguous(memory_format=torch.channels_last)), m(x)) <= TOL


def test_fused_block_engine_saves_and_reloads(tmp_path):
    """An engine with a fused inverted-residual block round-trips through save/load: same outputs, same plan."""
    from sparseforge.engine.testing import Case, build_case

    c = Case(cin=8, cout=24, h=6, w=5, k=1, stride=1, pad=0, bias=True, bn=True, act="relu6", residual=True,
             depthwise=False, second=False, sparsity="kernels", batch=3, seed=7, inverted=True)
    m, x = build_case(c)
    e = compile(m, x[:1], threads=2)
    assert sum("fused_block" in op for op in e.spec["ops"]) == 1
    e.save(tmp_path / "eng")
    e2 = load_engine(tmp_path / "eng")
    assert [op.get("fused_into") for op in e2.spec["ops"]] == [op.get("fused_into") for op in e.spec["ops"]]
    assert torch.equal(e2(x), e(x))
    with torch.inference_mode():
        assert rel_err(e2(x), m(x)) <= TOL


def test_nonfinite_weights_are_refused_naming_the_layer():
    m = _model("resnet20")
    with torch.no_grad():
        m.layer2[1].conv1.weight[3, 2, 1, 1] = float("nan")
    with pytest.raises(SparseforgeError, match="layer2.1.conv1.*NaN or Inf"):
        compile(m, torch.randn(1, 3, 32, 32), threads=1)
    m = _model("resnet20")
    m.bn1.running_mean[0] = float("inf")
    with pytest.raises(SparseforgeError, match="NaN or Inf"):
        compile(m, torch.randn(1, 3, 32, 32), threads=1)


@pytest.mark.parametrize("align", [None, (1, 16, "gi16"), (0, 16, "gi16"), (15, 16, "gi16")])
@pytest.mark.parametrize("G", [1, 2])
def test_shared_loads_compute_every_tap(align, G):
    """The kernel body with shared loads (and, with ``align``, aligned loads cut by lane shifts) adds exactly
    the products the plain body would: the generated statements are run on a numpy model of the vectors, for
    a 3x3 pattern over flat tiles whose taps a row apart share vectors."""
    import re

    import numpy as np

    from sparseforge.engine.codegen import _accumulate_shared

    rng = np.random.default_rng(0)
    L, rs, nacc = 16, 32, 9
    offs = [-rs - 1, -1, 0, rs + 1]
    plane = rng.standard_normal(1024).astype(np.float64)
    base = 208 + (align[0] if align else 3)          # ip: m floats past a vector boundary (208 = 13 x 16)
    k = {f"k{t}" + (f"g{g}" if G > 1 else ""): float(rng.standard_normal()) for t in range(4) for g in range(G)}
    env = dict(k)
    for i in range(nacc):
        for g in range(G):
            env[f"a{i}" + (f"g{g}" if G > 1 else "")] = np.zeros(L)
    body = _accumulate_shared([f"a{i}" for i in range(nacc)], [i * L for i in range(nacc)], offs, "ldg16", G,
                              "g16", align)
    loads = [ln for ln in body if "ldg16(" in ln]
    for ln in body:
        s = ln.strip().strip("{}").strip()
        for stmt in [x.strip() for x in s.split(";") if x.strip()]:
            if m_ := re.fullmatch(r"(?:const )?g16 (\w+) = ldg16\(ip \+ (-?\d+)\)", stmt):
                o = base + int(m_.group(2))
                env[m_.group(1)] = plane[o:o + L].copy()
            elif m_ := re.fullmatch(r"(?:const )?g16 (\w+) = ALIGNR16\(g16, gi16, (\w+), (\w+), (\d+)\)", stmt):
                r = int(m_.group(4))
                env[m_.group(1)] = np.concatenate([env[m_.group(2)], env[m_.group(3)]])[r:r + L]
            elif m_ := re.fullmatch(r"(\w+) \+= (\w+) \* ldg16\(ip \+ (-?\d+)\)", stmt):
                o = base + int(m_.group(3))
                env[m_.group(1)] = env[m_.group(1)] + env[m_.group(2)] * plane[o:o + L]
            elif m_ := re.fullmatch(r"(\w+) \+= (\w+) \* (\w+)", stmt):
                env[m_.group(1)] = env[m_.group(1)] + env[m_.group(2)] * env[m_.group(3)]
            else:
                assert stmt.startswith("KEEP("), stmt
    for i in range(nacc):
        for g in range(G):
            sfx = f"g{g}" if G > 1 else ""
            want = sum(k[f"k{t}{sfx}"] * plane[base + i * L + o:base + i * L + o + L] for t, o in enumerate(offs))
            np.testing.assert_allclose(env[f"a{i}{sfx}"], want, rtol=1e-12, atol=1e-12)
    if align is not None:
        # each aligned vector loaded once, at an aligned offset; no unaligned load left
        addrs = [int(re.search(r"ip \+ (-?\d+)", ln).group(1)) for ln in loads]
        assert len(addrs) == len(set(addrs)) and all((base + a) % L == 0 for a in addrs)


@pytest.mark.parametrize("prefetch", [0, 1024])
@pytest.mark.parametrize("inputs", [300, 70000])
def test_pruned_linear_csr(inputs, prefetch):
    """Pruned linears run as CSR (2-byte column indices up to 65536 inputs, 4-byte beyond), rows of every kept
    count (0 .. several times the 4-way unroll and the 16-entry prefetch blocks, so every tail runs) at batch 1, 3
    and 6 (four images at once, then one by one), with and without prefetching, against PyTorch."""
    torch.manual_seed(0)
    fc = nn.Linear(inputs, 13)
    with torch.no_grad():
        keep = torch.zeros_like(fc.weight, dtype=torch.bool)
        for r in range(13):
            keep[r, torch.randperm(inputs)[:r * 3 + (r % 4) * 7 if r else 0]] = True
        fc.weight.mul_(keep)
    m = nn.Sequential(nn.Flatten(), fc, nn.ReLU()).eval()
    e = compile(m, torch.randn(1, 1, 1, inputs), threads=2, plan_options=PlanOptions(linear_prefetch=prefetch))
    assert any("density" in op["describe"] for op in e.spec["ops"]), e.summary()
    for n in (1, 3, 6):
        x = torch.randn(n, 1, 1, inputs)
        assert rel_err(e(x), m(x)) <= TOL
