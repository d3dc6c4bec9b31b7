"""torchrun --nproc-per-node 2 (gloo, CPU): identical ranks, and the same weights as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from recipe_util import recipe_toml

pytestmark = pytest.mark.slow      # the fast tier (pytest -m "not slow") skips it; CI runs all

HERE = Path(__file__).parent


def _run(cmd, **kw):
    """subprocess.run that, when a run hangs, fails with what the ranks printed (a bare TimeoutExpired hides it)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        pytest.fail(f"timed out after {e.timeout} s: {' '.join(map(str, cmd))}\n{out[-4000:]}")


def _torchrun_child(tmp_path, mode, env, nproc=2):
    """_ddp_child.py under torchrun. Passes when every rank finished its work (printed 'rank r: done' after writing
    its weights, which the caller then checks) even if one was then killed in torch's C++ teardown: that SIGABRT
    ("terminate called without an active exception", seen twice in CI on 2 busy cores, never reproduced in 100+
    local runs) happens after our code returned; it is reported as a warning carrying the ranks' stderr (with
    faulthandler's stacks) so the CI log keeps the evidence. Anything else that fails, fails the test."""
    import warnings

    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
              str(HERE / "_ddp_child.py"), str(tmp_path), mode], env=env)
    if r.returncode != 0:
        finished = all(f"rank {k}: done" in r.stderr for k in range(nproc))
        assert finished and "SIGABRT" in r.stderr, r.stderr[-3000:]
        warnings.warn(f"torchrun exited {r.returncode} after every rank finished (teardown abort):\n"
                      f"{r.stderr[-3000:]}")
    return r


def _ddp_child_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ddp_child", HERE / "_ddp_child.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["plain", "kd-online"])
def test_two_process_ddp_matches_one_process(tmp_path, mode):
    """kd-online: the student distils from a teacher that trains beside it; both nets must stay identical across
    ranks and equal the one-process run (the teacher's gradients are averaged as the student's are)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    _torchrun_child(tmp_path, mode, env)
    r1 = _run([sys.executable, str(HERE / "_ddp_child.py"), str(tmp_path), mode], env=env)
    assert r1.returncode == 0, r1.stderr[-3000:]
    tag = "kd-" if mode == "kd-online" else ""
    a, b = (load_file(str(tmp_path / f"{tag}rank0-of-2.safetensors")),
            load_file(str(tmp_path / f"{tag}rank1-of-2.safetensors")))
    one = load_file(str(tmp_path / f"{tag}rank0-of-1.safetensors"))
    if mode == "kd-online":
        t0 = load_file(str(tmp_path / "kd-rank0-of-2.safetensors"))
        assert any(k.startswith("teacher.") for k in t0)
        # the teacher moved (it trains), and identically everywhere (checked with every key below)
        torch.manual_seed(99)
        fresh = _ddp_child_module().Tiny().state_dict()
        assert not torch.allclose(t0["teacher.c1.weight"], fresh["c1.weight"])
    masks = [k for k in a if k.endswith("weight_mask")]
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)          # rank 0's masks everywhere
    assert all(torch.equal(a[k], b[k]) for k in a)                        # bit-identical parameters
    assert all(torch.equal(a[k], one[k]) for k in masks)
    # same global batch -> same weights, up to float summation order (two half-batch gradients averaged vs one
    # batch; KD's softmaxes of two nets, 8 steps of momentum: measured 2.5e-6 at most)
    tol = dict(rtol=1e-4, atol=1e-5) if mode == "kd-online" else dict(rtol=1e-5, atol=1e-6)
    for k in a:
        torch.testing.assert_close(a[k], one[k], **tol)
    w0 = a["c2.weight"]
    assert bool((w0[a["c2.weight_mask"] == 0] == 0).all())


def test_sync_bn_makes_two_processes_equal_one(tmp_path):
    """With BatchNorm, per-rank statistics make a 2-process run differ from one process on the same global batch;
    TrainConfig.sync_bn (global-batch statistics, all-reduced with autograd; CPU/gloo) makes them equal."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    for mode in ("bn-sync", "bn-local"):
        _torchrun_child(tmp_path, mode, env)
        r1 = _run([sys.executable, str(HERE / "_ddp_child.py"), str(tmp_path), mode], env=env)
        assert r1.returncode == 0, r1.stderr[-3000:]
    one = {m: load_file(str(tmp_path / f"{m}rank0-of-1.safetensors")) for m in ("bnsync-", "bnlocal-")}
    for m in ("bnsync-", "bnlocal-"):      # the 1-process references are the same run (sync_bn is a no-op there)
        assert all(torch.equal(one["bnsync-"][k], one[m][k]) for k in one[m])
    a, b = (load_file(str(tmp_path / f"bnsync-rank{r}-of-2.safetensors")) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    masks = [k for k in a if k.endswith("weight_mask")]
    assert masks and all(torch.equal(a[k], one["bnsync-"][k]) for k in masks)
    for k in a:                            # weights and running statistics
        torch.testing.assert_close(a[k], one["bnsync-"][k], rtol=1e-4, atol=1e-5)
    local = load_file(str(tmp_path / "bnlocal-rank0-of-2.safetensors"))
    assert not torch.allclose(local["b1.running_var"], one["bnsync-"]["b1.running_var"], rtol=1e-4, atol=1e-5)


def test_recipe_runs_under_torchrun(tmp_path):
    """sparseforge run under 2 processes: finishes, rank 0 alone writes and talks, masks identical."""
    (tmp_path / "r.toml").write_text(recipe_toml("""
[[stage]]
method = "pattern"
connectivity = "2x"
[[stage]]
method = "finetune"
epochs = 1
"""))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
             "sparseforge.cli", "run", str(tmp_path / "r.toml"), "--run-dir", str(tmp_path / "run"),
             "--no-progress"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("final test accuracy") == 1 and r.stderr.count("stage 1 (finetune): test acc") == 1
    w = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.endswith("weight_mask") for k in w)


@pytest.mark.parametrize("command", ["run", "train"])
def test_a_late_rank_follows_rank_0s_view_of_the_run_directory(tmp_path, command):
    """Rank 1 arrives 3 s after rank 0 has written start.json (run) / config.toml (train): it must branch as rank
    0 did (before the fix: a hang in mismatched collectives / 'already holds a run' on rank 1 only)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    if command == "run":
        (tmp_path / "r.toml").write_text(recipe_toml("""
[[stage]]
method = "magnitude"
sparsity = 0.5
"""))
        args = ["run", str(tmp_path / "r.toml")]
    else:
        args = ["train", "--model", "smallcnn", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32",
                "--train-size", "128", "--test-size", "64", "--threads", "1"]
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              str(HERE / "_ddp_race_child.py"), *args, "--run-dir", str(tmp_path / "run"), "--no-progress"],
             env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "error" not in r.stderr.lower(), r.stderr[-3000:]
    if command == "train":
        assert r.stdout.count("\"test_acc\"") == 1, r.stdout      # rank 0 alone prints the result
