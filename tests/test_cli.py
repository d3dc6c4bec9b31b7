import re
import pytest
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sparseforge.cli import main
from sparseforge.models import create_model

SRC = str(Path(__file__).resolve().parents[1] / "src")


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def main_in_process(capsys, *args) -> _Result:
    """The CLI's ``main`` in this process (a subprocess costs ~2.5 s of imports): an exception that escapes it fails
    the test as a traceback would; argparse's exit is its return code. test_python_dash_m_sparseforge_is_the_cli
    keeps one real subprocess."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    out = capsys.readouterr()
    return _Result(rc, out.out, out.err)


def assert_one_line_error(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    # missing data dir
    assert_one_line_error(main_in_process(capsys, "eval", "--model", "resnet20", "--data-dir", tmp_path / "nope"), "does not exist")
    # unknown model name
    assert_one_line_error(main_in_process(capsys, "eval", "--model", "resnet21", "--dataset", "synthetic"), "unknown model 'resnet21'")
    # wrong file format
    bad = tmp_path / "weights.pt"
    bad.write_text("this is not a checkpoint")
    assert_one_line_error(main_in_process(capsys, "stats", "--model", "resnet20", "--weights", bad), "cannot read")
    # checkpoint for another architecture
    save_file(create_model("resnet32").state_dict(), str(tmp_path / "r32.safetensors"))
    assert_one_line_error(main_in_process(capsys, "stats", "--model", "resnet20", "--weights", tmp_path / "r32.safetensors"),
                          "does not fit model resnet20")
    # truncated checkpoint
    blob = (tmp_path / "r32.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 3])
    assert_one_line_error(main_in_process(capsys, "stats", "--model", "resnet32", "--weights", tmp_path / "cut.safetensors"),
                          "truncated or corrupt")
    # bad TOML field
    (tmp_path / "c.toml").write_text('model = "smallcnn"\nepoch = 3\n')
    assert_one_line_error(main_in_process(capsys, "train", "--config", tmp_path / "c.toml"), "unknown field 'epoch'")
    (tmp_path / "d.toml").write_text('optimizer = "rmsprop"\n')
    assert_one_line_error(main_in_process(capsys, "train", "--config", tmp_path / "d.toml"), "'sgd' | 'adam' | 'adamw'")


def test_help_everywhere(capsys):
    for cmd in ([], ["train"], ["eval"], ["demo"], ["info"], ["stats"], ["groups"]):
        r = main_in_process(capsys, *cmd, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout


def test_python_dash_m_sparseforge_is_the_cli():
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "sparseforge", "stats", "--model", "smallcnn", "--size", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(r, "--size")
    r = subprocess.run([sys.executable, "-m", "sparseforge", "--help"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("usage: sparseforge")


def test_train_flags_come_from_config(tmp_path, capsys):
    rc = main(["train", "--model", "smallcnn", "--train-size", "64", "--test-size", "20", "--batch-size", "32",
               "--epochs", "1", "--threads", "1", "--run-dir", str(tmp_path / "r"), "--no-progress", "--no-augment"])
    assert rc == 0
    saved = (tmp_path / "r" / "config.toml").read_text()
    assert "augment = false" in saved and 'model = "smallcnn"' in saved
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["epoch"] == 1
    # resume with a different flag is refused, naming the flag
    rc = main(["train", "--run-dir", str(tmp_path / "r"), "--resume", "--epochs", "2"])
    assert rc == 2


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "resnet20" in info["models"] and info["torch"] == torch.__version__


def test_groups_preflight(capsys):
    """`sparseforge groups`: ResNet-20 has 13 groups (the classifier's blocked: network output), the option-A
    stream of stage 2 splits into the channels tied to stage 1 and the zero-padded ones, and 7 of its 9 blocks
    (not the two downsampling ones) can be dropped, each 1/8.6 of the MACs; --ignore blocks a group by name."""
    assert main(["groups", "--model", "resnet20", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    gs = {g["name"]: g for g in d["groups"]}
    assert len(gs) == 13 and gs["linear"]["blocked"] == "network output"
    assert [n for n, g in gs.items() if g["blocked"]] == ["linear"]
    assert "residual" in gs["conv1"]["kinds"] and "layer3.2.conv2" in gs["conv1"]["modules"]
    assert gs["layer2.0.conv2"]["channels"] == 16 and "residual" in gs["layer2.0.conv2"]["kinds"]
    assert sorted(d["droppable_blocks"]) == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2",
                                             "layer3.1", "layer3.2"]
    assert all(abs(v - d["droppable_blocks"]["layer1.0"]) < 1e-9 for v in d["droppable_blocks"].values())
    assert main(["groups", "--model", "resnet20", "--ignore", "layer1.0.conv1"]) == 0
    out = capsys.readouterr().out
    assert "BLOCKED (ignored layer layer1.0.conv1)" in out and "7 residual blocks DepthConfig may drop" in out


@pytest.mark.slow      # 10,000 shared test images
def test_eval_shared_resnet20(models_dir, cifar_dir, capsys):
    rc = main(["eval", "--model", "resnet20", "--weights", str(next(models_dir.glob("akamaster_resnet20-*.th"))),
               "--data-dir", str(cifar_dir), "--normalize", "imagenet", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 10000
    assert abs(res["acc"] - 81.03) <= 0.1


@pytest.mark.slow
def test_demo_runs(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--epochs", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    report = Path(out.strip().splitlines()[-1].split("report: ")[1])
    assert report.suffix == ".html" and report.exists()
    md = (report.parent / "report.md").read_text()
    assert "| **total** |" in md and "Measured latency" in md
    m = re.search(r"speedup ([0-9.]+)x vs PyTorch", out)
    res = json.loads((report.parent / "results.json").read_text())
    lat = res["stages"][-1]["latency"]["1"]
    assert m and float(m.group(1)) == pytest.approx(lat["torch-dense"]["median_ms"] / lat["sparseforge"]["median_ms"],
                                                    abs=0.006)


def test_second_run_on_a_directory_fails_at_once(tmp_path, capsys):
    """One run per directory: while a process holds the run's lock, a second `train` or `run` on it exits 2 at
    once with one line; the lock dies with its holder (kill -9 included); a file as run dir is one line too."""
    import signal
    import time

    from sparseforge.utils import RunLock

    rd = tmp_path / "r"
    args = ["train", "--model", "smallcnn", "--train-size", "64", "--test-size", "20", "--batch-size", "32",
            "--epochs", "1", "--threads", "1", "--no-progress", "--run-dir", rd]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from sparseforge.utils import RunLock; RunLock(sys.argv[2]).acquire();"
                               "print('held', flush=True); time.sleep(120)", SRC, str(rd)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        r = main_in_process(capsys, *args)
        assert_one_line_error(r, "in use by another sparseforge run")
        assert f"pid {holder.pid}" in r.stderr
        assert time.perf_counter() - t0 < 60
        assert not (rd / "config.toml").exists()            # nothing was written by the refused run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(rd):                                       # released by the kill: the next run proceeds
        pass
    assert main_in_process(capsys, *args).returncode == 0
    f = tmp_path / "afile"
    f.write_text("x")
    assert_one_line_error(main_in_process(capsys, *args[:-1], f), "is a file, not a run directory")


def test_nonfinite_weights_and_divergence_are_one_line_errors(tmp_path, capsys):
    m = create_model("smallcnn", num_classes=10)
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    first = next(k for k in sd if k.endswith("weight"))
    sd[first].view(-1)[0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"), metadata={"model": json.dumps({"name": "smallcnn", "num_classes": 10})})
    assert_one_line_error(main_in_process(capsys, "eval", "--model", "smallcnn", "--dataset", "synthetic", "--weights",
                                  tmp_path / "nan.safetensors"), "NaN or Inf")
    r = main_in_process(capsys, "train", "--model", "smallcnn", "--train-size", "64", "--test-size", "20", "--batch-size", "32",
                "--epochs", "2", "--threads", "1", "--no-progress", "--lr", "1e12", "--run-dir", tmp_path / "r")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errs = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errs) == 1 and "training diverged" in errs[0] and "at step" in errs[0], r.stderr


def _weights_with_meta(path, meta):
    m = create_model("smallcnn", num_classes=10)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path),
              metadata={"format": "sparseforge-weights-1", **({"model": meta} if meta is not None else {})})
    return path


def test_bad_input_table(tmp_path, capsys):
    """Every clumsy input of issue 25 sections 2-3 we cover: exit 2, one line naming the problem, no traceback."""
    good = _weights_with_meta(tmp_path / "good.safetensors", json.dumps({"name": "smallcnn", "num_classes": 10}))
    rec = tmp_path / "ok.toml"
    rec.write_text('model = "smallcnn"\n[train]\ndataset = "synthetic"\ntrain_size = 64\ntest_size = 20\n'
                   '[[stage]]\nmethod = "finetune"\nepochs = 1\n')
    st_model = tmp_path / "stage_model.toml"
    st_model.write_text(rec.read_text() + '[stage.train]\nmodel = "resnet20"\n')
    binary = tmp_path / "bin.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    train = ["train", "--model", "smallcnn", "--train-size", "64", "--test-size", "20", "--epochs", "1",
             "--threads", "1", "--no-progress"]
    cases = [
        (["eval", "--model", "smallcnn", "--dataset", "synthetic", "--limit", "-5"], "--limit"),
        (train + ["--batch-size", "500", "--run-dir", tmp_path / "r_big"], "larger than the training set"),
        (["run", st_model, "--run-dir", tmp_path / "r_st"], "stage[0].train sets model"),
        (["run", binary, "--run-dir", tmp_path / "r_bin"], "not a text (TOML) file"),
        (["run", rec, "--set", "stage=1", "--run-dir", tmp_path / "r_s1"], "--set stage"),
        (["run", rec, "--set", "stage.0=5", "--run-dir", tmp_path / "r_s2"], "--set stage"),
        (["run", rec, "--run-dir", a_file], "is a file, not a run directory"),
        (train + ["--run-dir", a_file], "is a file, not a run directory"),
        (["compile", good, "--input-shape", "3,x,32", "--out", tmp_path / "e1"], "--input-shape"),
        (["compile", good, "--input-shape", "0,0,0", "--out", tmp_path / "e2"], "--input-shape"),
        (["compile", good, "--threads", "-3", "--out", tmp_path / "e3"], "--threads"),
        (["bench", good, "--runs", "0"], "--runs"),
        (["bench", good, "--threads", "0"], "--threads"),
        (["stats", "--model", "smallcnn", "--size", "0"], "--size"),
    ]
    for name, meta, needle in [("nonjson", "{not json", "not JSON"), ("list", "[1, 2]", "not an object"),
                               ("neg", json.dumps({"name": "smallcnn", "num_classes": -5}), "num_classes=-5")]:
        w = _weights_with_meta(tmp_path / f"{name}.safetensors", meta)
        cases += [(["compile", w, "--out", tmp_path / f"e_{name}"], needle),
                  (["export", w, "--out", tmp_path / f"{name}.onnx"], needle)]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage")
    cases.append((train + ["--weights", garbage, "--run-dir", tmp_path / "r_w"], "cannot read"))
    bad_batches = tmp_path / "bad_batches.toml"
    bad_batches.write_text(rec.read_text() + '[[stage]]\nmethod = "compile"\nbatches = [-1]\n')
    cases.append((["run", bad_batches, "--run-dir", tmp_path / "r_bb"], "batches"))
    # resume from damaged or foreign checkpoints (hashes recomputed, so only the content is wrong)
    small = train + ["--batch-size", "16"]
    assert main_in_process(capsys, *small, "--run-dir", tmp_path / "r0").returncode == 0
    ck = tmp_path / "r0" / "checkpoints"
    tag = json.loads((ck / "latest.json").read_text())["tag"]
    for name, damage, needle in [
            ("list", lambda d: (d / "latest.json").write_text("[1, 2]"), "latest.json is corrupt"),
            ("path", lambda d: (d / "latest.json").write_text('{"tag": "../../x"}'), "not a checkpoint name"),
            ("nosha", lambda d: _drop_sha(d / f"{tag}.json"), "no sha256"),
            ("arch", lambda d: _foreign_weights(d, tag), "does not fit this run's model")]:
        d = tmp_path / f"r_{name}"
        shutil.copytree(tmp_path / "r0", d)
        (d / ".lock").unlink(missing_ok=True)
        damage(d / "checkpoints")
        cases.append((small + ["--resume", "--run-dir", d], needle))
    for args, needle in cases:
        assert_one_line_error(main_in_process(capsys, *args), needle)
    for failed in ("r_big", "r_w"):          # a failed start leaves nothing that blocks a rerun
        assert not (tmp_path / failed / "config.toml").exists()


def _drop_sha(meta: Path) -> None:
    d = json.loads(meta.read_text())
    del d["sha256"]
    meta.write_text(json.dumps(d))


def _foreign_weights(ck: Path, tag: str) -> None:
    """Another architecture's weights under the checkpoint's name, with the record's hash recomputed."""
    import hashlib

    w = ck / f"{tag}.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("resnet20").state_dict().items()}, str(w))
    meta = ck / f"{tag}.json"
    d = json.loads(meta.read_text())
    d["sha256"]["weights"] = hashlib.sha256(w.read_bytes()).hexdigest()
    meta.write_text(json.dumps(d))


def test_edited_config_is_refused_on_resume(tmp_path, capsys):
    rd = tmp_path / "r"
    r = main_in_process(capsys, "train", "--model", "smallcnn", "--train-size", "64", "--test-size", "20", "--batch-size", "32",
                "--epochs", "1", "--threads", "1", "--no-progress", "--run-dir", rd)
    assert r.returncode == 0, r.stderr
    cfg = rd / "config.toml"
    cfg.write_text("\n".join("lr = 0.5" if l.startswith("lr =") else l for l in cfg.read_text().splitlines()) + "\n")
    assert_one_line_error(main_in_process(capsys, "train", "--run-dir", rd, "--resume"), "lr: 0.1 -> 0.5")


@pytest.mark.parametrize("err", ["ENOSPC", "EACCES", "EROFS"])
def test_full_disk_and_read_only_directory_are_one_line_errors(tmp_path, capsys, monkeypatch, err):
    """The OS refusing a write (full disk, no permission, read-only file system: simulated, the test may run as
    root) ends in one line naming the file and the fix, exit 2; a file written before stays intact."""
    import errno
    import tempfile

    import sparseforge.utils as u

    run = tmp_path / "run"
    assert main(["train", "--model", "smallcnn", "--train-size", "64", "--test-size", "20", "--epochs", "1",
                 "--threads", "1", "--no-progress", "--batch-size", "16", "--run-dir", str(run)]) == 0
    before = (run / "config.toml").read_bytes()
    capsys.readouterr()
    code = getattr(errno, err)

    def refuse(*a, dir=None, **k):
        raise OSError(code, os.strerror(code), str(dir))

    monkeypatch.setattr(u.tempfile, "mkstemp", refuse)
    rc = main(["train", "--model", "smallcnn", "--train-size", "64", "--test-size", "20", "--epochs", "2",
               "--threads", "1", "--no-progress", "--batch-size", "16", "--run-dir", str(tmp_path / "run2")])
    err_out = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err_out) == 1 and "Traceback" not in err_out[0], err_out
    assert os.strerror(code) in err_out[0] and str(tmp_path / "run2") in err_out[0]
    assert ("df -h" in err_out[0]) == (err == "ENOSPC")
    assert (run / "config.toml").read_bytes() == before
    monkeypatch.setattr(u.tempfile, "mkstemp", tempfile.mkstemp)


def test_eval_rebuilds_the_model_a_weights_file_records(tmp_path, capsys):
    """A structurally pruned model (other widths than create_model's) evaluates from its file alone: eval rebuilds
    it from the spec the file records; a file that records nothing needs --model (one line)."""
    import torch

    from sparseforge import StructuredConfig, prune
    from sparseforge.models import save_weights

    m = create_model("smallcnn", num_classes=10)
    prune(m, StructuredConfig(mac_ratio=0.5), example_input=torch.randn(1, 3, 32, 32))
    save_weights(m, tmp_path / "small.safetensors")
    r = main_in_process(capsys, "eval", "--weights", tmp_path / "small.safetensors", "--dataset", "synthetic",
                        "--limit", "50")
    assert r.returncode == 0 and "smallcnn on synthetic test (50 images)" in r.stdout, r.stderr
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("smallcnn").state_dict().items()}, str(bare))
    assert_one_line_error(main_in_process(capsys, "eval", "--weights", bare, "--dataset", "synthetic"), "pass --model")
