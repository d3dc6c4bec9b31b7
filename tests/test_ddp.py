"""torchrun --nproc-per-node 2 (gloo, CPU): identical ranks, and the same weights as one process."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def test_two_process_ddp_matches_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(HERE / "_ddp_child.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = subprocess.run([sys.executable, str(HERE / "_ddp_child.py"), str(tmp_path)], env=env, capture_output=True,
                        text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rank0-of-2.safetensors")), load_file(str(tmp_path / "rank1-of-2.safetensors"))
    one = load_file(str(tmp_path / "rank0-of-1.safetensors"))
    masks = [k for k in a if k.endswith("weight_mask")]
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)          # rank 0's masks everywhere
    assert all(torch.equal(a[k], b[k]) for k in a)                        # bit-identical parameters
    assert all(torch.equal(a[k], one[k]) for k in masks)
    for k in a:                                                           # same global batch -> same weights
        torch.testing.assert_close(a[k], one[k], rtol=1e-5, atol=1e-6)
    w0 = load_file(str(tmp_path / "rank0-of-2.safetensors"))["c2.weight"]
    assert bool((w0[a["c2.weight_mask"] == 0] == 0).all())


def test_recipe_runs_under_torchrun(tmp_path):
    """sparseforge run under 2 processes: finishes, rank 0 alone writes and talks, masks identical."""
    (tmp_path / "r.toml").write_text("""
model = "smallcnn"
dataset = "synthetic"
[train]
batch_size = 32
lr = 0.05
train_size = 128
test_size = 64
threads = 1
[[stage]]
method = "pattern"
connectivity = "2x"
[[stage]]
method = "finetune"
epochs = 1
""")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "sparseforge.cli", "run", str(tmp_path / "r.toml"), "--run-dir", str(tmp_path / "run"),
                        "--no-progress"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("final test accuracy") == 1 and r.stderr.count("stage 1 (finetune): test acc") == 1
    w = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.endswith("weight_mask") for k in w)
