import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparseforge.api import train
from sparseforge.errors import CheckpointError, RunDirError
from sparseforge.train import TrainConfig, latest_checkpoint, load_checkpoint
from sparseforge.train.schedule import lr_factor

HERE = Path(__file__).parent
TINY = dict(model="smallcnn", dataset="synthetic", train_size=320, test_size=100, batch_size=32, epochs=3,
            lr=0.05, threads=1, checkpoint_every=4, schedule="cosine", seed=7)


def _child(run_dir, kill_at, resume, cfg_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    return subprocess.run([sys.executable, str(HERE / "_train_child.py"), str(run_dir), str(kill_at), "1" if resume else "0",
                           str(cfg_path)], env=env, capture_output=True, text=True, timeout=300)


def _final_weights(run_dir):
    ref = latest_checkpoint(Path(run_dir))
    return load_file(str(ref.weights_path)), json.loads(ref.meta_path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_mid_epoch_resumes_to_identical_weights(tmp_path, precision):
    cfg = TrainConfig(**TINY, precision=precision)
    cfg_path = tmp_path / "cfg.toml"
    cfg.save(cfg_path)
    # 10 steps per epoch; kill at step 16 = epoch 2, batch 6, after the checkpoint at step 12 and before the next
    r = _child(tmp_path / "a", 0, False, cfg_path)
    assert r.returncode == 0, r.stderr
    r = _child(tmp_path / "b", 16, False, cfg_path)
    assert r.returncode == -signal.SIGKILL, r.stderr
    ref = latest_checkpoint(tmp_path / "b")
    assert json.loads(ref.meta_path.read_text())["step"] == 12
    r = _child(tmp_path / "b", 0, True, cfg_path)
    assert r.returncode == 0, r.stderr
    assert "resumed from step-000000012" in r.stderr
    wa, ma = _final_weights(tmp_path / "a")
    wb, mb = _final_weights(tmp_path / "b")
    assert ma["step"] == mb["step"] == 30
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # metrics.jsonl has each epoch once, with the same test accuracy
    la = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lb] == [1, 2, 3]
    assert la[-1]["test_acc"] == lb[-1]["test_acc"]


def test_run_dir_never_overwritten(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 1})
    train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(RunDirError, match="--resume"):
        train(cfg, tmp_path / "r", progress=False)
    # resuming a finished run is a no-op that keeps the weights
    before = load_file(str(latest_checkpoint(tmp_path / "r").weights_path))
    train(cfg, tmp_path / "r", resume=True, progress=False)
    after = load_file(str(latest_checkpoint(tmp_path / "r").weights_path))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_tamper_detected(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 1})
    train(cfg, tmp_path / "r", progress=False)
    ref = latest_checkpoint(tmp_path / "r")
    blob = ref.weights_path.read_bytes()
    ref.weights_path.write_bytes(blob[:-100])
    with pytest.raises(CheckpointError, match="truncated or modified"):
        load_checkpoint(ref)


def test_keeps_only_recent_checkpoints(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 2, "keep_checkpoints": 2})
    train(cfg, tmp_path / "r", progress=False)
    assert len(list((tmp_path / "r" / "checkpoints").glob("step-*.json"))) == 2
    assert not list((tmp_path / "r" / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("opt", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
def test_learns_synthetic(tmp_path, opt):
    lr = 0.05 if opt == "sgd" else 3e-3
    cfg = TrainConfig(model="smallcnn", dataset="synthetic", train_size=4000, test_size=500, epochs=4, lr=lr,
                      optimizer=opt, schedule="onecycle", threads=torch.get_num_threads())
    _, res = train(cfg, tmp_path / "r", progress=False)
    assert res["test_acc"] > 90.0, res


@pytest.mark.slow
def test_bf16_training_learns_like_fp32_and_keeps_fp32_state(tmp_path):
    """bf16 autocasts the forward only: parameters, checkpoints and evaluation stay fp32, and on the synthetic task
    it learns as fp32 does (same seed; they differ by rounding only)."""
    base = dict(model="smallcnn", dataset="synthetic", train_size=2000, test_size=500, epochs=4, lr=0.05, batch_size=32,
                schedule="onecycle", threads=2)
    m16, r16 = train(TrainConfig(**base, precision="bf16"), tmp_path / "bf16", progress=False)
    m32, r32 = train(TrainConfig(**base), tmp_path / "fp32", progress=False)
    assert r16["test_acc"] > 90.0 and abs(r16["test_acc"] - r32["test_acc"]) < 5.0, (r16, r32)
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    w, _ = _final_weights(tmp_path / "bf16")
    assert all(t.dtype in (torch.float32, torch.int64) for t in w.values()), {t.dtype for t in w.values()}
    # the runs really differ (bf16 arithmetic was used), by rounding-sized amounts
    w32, _ = _final_weights(tmp_path / "fp32")
    k = next(k for k in w if k.endswith("weight") and w[k].ndim == 4)
    rel = float((w[k] - w32[k]).norm() / w32[k].norm())
    assert 0 < rel < 0.5, rel


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])   # bf16: 30 s compile
def test_compiled_step_computes_what_eager_computes(precision):
    """TrainConfig.compile changes the speed, not what is computed: one training step's loss and gradients equal
    eager's up to float reassociation (fp32) or to bf16 rounding at other points of the graph (bf16)."""
    import copy

    import sparseforge as sf
    from sparseforge.train import Trainer

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = sf.create_model("smallcnn")
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    out = {}
    for comp in (False, True):
        m = copy.deepcopy(model).train()
        tr = Trainer(m, TrainConfig(model="smallcnn", compile=comp, precision=precision, threads=2),
                     train_loader=None, log=lambda s: None)
        loss, _ = tr.compute_loss(x, y)
        loss.backward()
        out[comp] = (loss.item(), [p.grad.clone() for p in m.parameters()])
    (le, ge), (lc, gc) = out[False], out[True]
    tol_loss, tol_grad = (1e-5, 1e-4) if precision == "fp32" else (1e-2, 5e-2)
    assert abs(lc - le) / le < tol_loss, (lc, le)
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(gc, ge))
    assert rel < tol_grad, rel


@pytest.mark.slow      # a second torch.compile of a training step (~20 s cold); test_compiled_step covers the fast tier
def test_compiled_training_run_checkpoints_like_eager(tmp_path):
    """A compiled run learns and checkpoints under the eager model's keys (no torch.compile wrapper prefix), so its
    checkpoint loads into an eager model; after 16 steps its weights are still close to the eager run's (small
    per-step differences grow through training, ~1e-3 here)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    base = dict(model="smallcnn", dataset="synthetic", train_size=1024, test_size=256, epochs=2,
                max_steps_per_epoch=8, batch_size=64, lr=0.05, threads=2)
    _, rc = train(TrainConfig(**base, compile=True), tmp_path / "c", progress=False)
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])   # it really was compiled
    _, re_ = train(TrainConfig(**base), tmp_path / "e", progress=False)
    wc, _ = _final_weights(tmp_path / "c")
    we, _ = _final_weights(tmp_path / "e")
    assert wc.keys() == we.keys() and not any("_orig_mod" in k for k in wc)
    for k in we:
        if we[k].ndim >= 2:       # conv / linear weights (near-zero BN biases make relative errors meaningless)
            assert float((wc[k] - we[k]).norm() / we[k].norm()) < 2e-2, k
    assert abs(rc["test_acc"] - re_["test_acc"]) <= 2.0, (rc, re_)


@pytest.mark.slow      # a second torch.compile of a network (~17 s cold); test_compiled_step covers the fast tier
def test_compiled_kd_teacher_gives_eager_loss():
    """With TrainConfig.compile the KD teacher (no feature terms) runs as a frozen compiled graph (BN folded into its
    convs); the distillation loss is eager's up to float reassociation. With feature terms it stays eager (a compiled
    graph would skip the module hooks that read the features)."""
    import sparseforge as sf
    from sparseforge.distill import KDCallback, KDConfig
    from sparseforge.train import Trainer

    torch._dynamo.reset()
    torch.manual_seed(0)
    student, teacher = sf.create_model("smallcnn"), sf.create_model("smallcnn")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses = {}
    for comp in (False, True):
        cfg = TrainConfig(model="smallcnn", compile=comp, threads=2)
        kd = KDCallback(teacher, KDConfig(T=4.0, alpha=0.9))
        tr = Trainer(student, cfg, train_loader=None, callbacks=[kd], log=lambda s: None)
        student.eval()
        kd.on_train_begin(tr)
        assert (kd.teacher_forward is teacher) != comp
        losses[comp] = tr.compute_loss(x, y)[0].item()
        kd.on_train_end(tr)
        assert kd.teacher_forward is teacher
    assert abs(losses[True] - losses[False]) / losses[False] < 1e-4, losses
    kd = KDCallback(teacher, KDConfig(hint=1.0, taps=("features.0",)))
    kd.on_train_begin(Trainer(student, TrainConfig(model="smallcnn", compile=True), train_loader=None,
                              callbacks=[kd], log=lambda s: None))
    assert kd.teacher_forward is teacher
    kd.on_train_end(None)


def test_bf16_kd_losses_stay_close_to_fp32():
    """Teacher forward in bf16, KL and feature losses in fp32: the loss differs from fp32 by bf16 rounding of the
    forwards (~1e-2 relative), not more."""
    import sparseforge as sf
    from sparseforge.distill import KDCallback, KDConfig
    from sparseforge.train import Trainer

    torch.manual_seed(0)
    student, teacher = sf.create_model("resnet20"), sf.create_model("resnet20")
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses = {}
    for prec in ("fp32", "bf16"):
        cfg = TrainConfig(model="resnet20", precision=prec, threads=1)
        kd = KDCallback(teacher, KDConfig(T=4.0, alpha=0.9, hint=1.0, graph=0.5, rkd_distance=1.0, rkd_angle=1.0,
                                          taps=("layer1", "layer3")))
        tr = Trainer(student, cfg, train_loader=None, callbacks=[kd], log=lambda s: None)
        student.eval()      # fixed BN statistics: the two passes see the same network
        kd.on_train_begin(tr)
        loss, logits = tr.compute_loss(x, y)
        kd.on_train_end(tr)
        assert logits.dtype == torch.float32 and loss.dtype == torch.float32
        losses[prec] = loss.item()
    assert losses["fp32"] > 0 and losses["bf16"] != losses["fp32"] and abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.05, losses


def test_schedules():
    assert lr_factor("cosine", 0, 100) == 1.0 and lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert lr_factor("step", 60, 100, milestones=(0.5, 0.75)) == pytest.approx(0.1)
    assert lr_factor("step", 80, 100, milestones=(0.5, 0.75)) == pytest.approx(0.01)
    peak = max(lr_factor("onecycle", s, 100) for s in range(100))
    assert peak == pytest.approx(1.0) and lr_factor("onecycle", 0, 100) == pytest.approx(1 / 25)
    assert lr_factor("cosine", 0, 100, warmup_steps=10) == pytest.approx(0.1)


def test_label_smoothing_and_channels_last_run(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "label_smoothing": 0.1, "channels_last": True, "checkpoint_every": 0})
    model, res = train(cfg, tmp_path / "r", progress=False)
    assert "test_acc" in res
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)


def _online_setup(seed=0):
    import copy

    import sparseforge as sf
    from sparseforge.api import loaders_for
    from sparseforge.data import synthetic_splits

    cfg = TrainConfig(model="smallcnn", dataset="synthetic", batch_size=16, epochs=2, lr=0.05, threads=1,
                      augment=False, max_steps_per_epoch=3, channels_last=False, seed=seed)
    tr_ds, te_ds = synthetic_splits(64, 32, seed=seed)
    tl, el = loaders_for(cfg, tr_ds, te_ds)
    torch.manual_seed(seed)
    student, teacher = sf.create_model("smallcnn"), sf.create_model("smallcnn")
    return cfg, tl, el, student, teacher, copy


def test_online_kd_teacher_takes_its_own_step_on_the_same_batch():
    """KDConfig(online=True): one training step moves the teacher exactly as an SGD step on CE(teacher(x), y) at the
    step's learning rate would, and the student's gradient is the distillation loss's against the teacher's
    train-mode logits of that batch (before the teacher's update)."""
    from sparseforge.distill import KDCallback, KDConfig
    from sparseforge.train import Trainer
    from sparseforge.train.loop import build_optimizer

    cfg, tl, el, student, teacher, copy = _online_setup()
    cfg = TrainConfig(**{**cfg.to_dict(), "epochs": 1, "max_steps_per_epoch": 1})
    s_ref, t_ref = copy.deepcopy(student).train(), copy.deepcopy(teacher).train()
    kd = KDCallback(teacher, KDConfig(T=4.0, alpha=0.9, online=True))
    Trainer(student, cfg, tl, None, callbacks=[kd], log=lambda s: None).fit()

    x, y = next(iter(tl.iterate(0)))
    t_opt, s_opt = build_optimizer(t_ref, cfg), build_optimizer(s_ref, cfg)
    t_out = t_ref(x)
    s_out = s_ref(x)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s_out / 4, 1), torch.log_softmax(t_out.detach() / 4, 1),
                                    reduction="batchmean", log_target=True)
    (0.9 * 16 * kl + 0.1 * torch.nn.functional.cross_entropy(s_out, y)).backward()
    torch.nn.functional.cross_entropy(t_out, y).backward()
    t_opt.step()
    s_opt.step()
    for ref, got, who in ((t_ref, teacher, "teacher"), (s_ref, student, "student")):
        for (n, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
            if a.is_floating_point():
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (who, n, (a - b).abs().max())
    assert not torch.equal(t_ref.state_dict()["features.0.weight"], _online_setup()[4].state_dict()["features.0.weight"])
    assert kd.teacher_model.training is False     # handed back in eval mode


def test_online_kd_teacher_resumes_exactly(tmp_path):
    """The teacher's weights and optimizer state are in the checkpoint: training stopped after epoch 1 and resumed
    (with a fresh callback and a fresh copy of the start teacher) ends with the uninterrupted run's teacher."""
    from sparseforge.distill import KDCallback, KDConfig
    from sparseforge.train import Callback, Trainer

    class StopAfterFirst(Callback):
        name = "stop"

        def on_epoch_end(self, trainer, epoch, metrics):
            trainer.should_stop = True

    finals = {}
    for mode in ("straight", "resumed"):
        cfg, tl, el, student, teacher, copy = _online_setup()
        start = copy.deepcopy(teacher)
        kd = KDCallback(teacher, KDConfig(online=True))
        extra = [StopAfterFirst()] if mode == "resumed" else []
        Trainer(student, cfg, tl, el, callbacks=[kd, *extra], run_dir=tmp_path / mode, log=lambda s: None).fit()
        if mode == "resumed":
            assert len(kd.history) == 1
            kd = KDCallback(start, KDConfig(online=True))
            Trainer(student, cfg, tl, el, callbacks=[kd], run_dir=tmp_path / mode, log=lambda s: None).fit(resume=True)
        assert [h["epoch"] for h in kd.history] == [1, 2] and all("teacher_test_acc" in h for h in kd.history)
        finals[mode] = (copy.deepcopy(kd.teacher_model.state_dict()), copy.deepcopy(student.state_dict()))
    for a, b in zip(finals["straight"], finals["resumed"]):
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k


def test_device_resolution_names_the_problem_and_the_fix(monkeypatch):
    """TrainConfig.device: auto follows what torch sees; a GPU that is not there is an error saying what to do, never
    a silent CPU run; under torchrun each process takes its LOCAL_RANK's GPU. (The CUDA training path itself needs a
    GPU: none is available to this test suite.)"""
    from sparseforge.api import config_hash
    from sparseforge.errors import ConfigError
    from sparseforge.utils import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match='sees no CUDA GPU; use device = "cpu"'):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="cuda:N"):
        TrainConfig(device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    # where a run trains is not what it is: the default run directory does not depend on it
    assert config_hash(TrainConfig(device="cpu")) == config_hash(TrainConfig()) != config_hash(TrainConfig(epochs=3))


def test_trainer_gives_the_model_back_where_it_was(monkeypatch):
    """The loop moves the model to TrainConfig.device and back when fit ends, also when fit fails (pruning and the
    compiler that follow work on the CPU copy). Checked through the moves the trainer asks for, since no second
    device exists here."""
    from sparseforge.data import BatchLoader, synthetic_splits
    from sparseforge.models import create_model
    from sparseforge.train import Trainer

    tr, te = synthetic_splits(64, 32)
    model = create_model("smallcnn", num_classes=tr.num_classes)
    moves = []
    orig = torch.nn.Module.to

    def to(self, *a, **k):
        if self is model:
            moves.append(str(a[0]) if a else str(k.get("device")))
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    cfg = TrainConfig(model="smallcnn", epochs=1, batch_size=32, device="cpu", channels_last=False)
    t = Trainer(model, cfg, BatchLoader(tr, 32, shuffle=True), BatchLoader(te, 32), progress=False)
    t.fit()
    assert moves == ["cpu", "cpu", "cpu"]      # __init__, fit begin, fit end (home = cpu)

    class Boom(Exception):
        pass

    def fail(*a, **k):
        raise Boom

    moves.clear()
    t2 = Trainer(model, cfg, BatchLoader(tr, 32, shuffle=True), None, progress=False)
    t2.home_device = torch.device("meta")      # stands in for "a device other than the training one"
    monkeypatch.setattr(t2, "compute_loss", fail)
    with pytest.raises(Boom):
        t2.fit()
    assert moves == ["cpu", "cpu", "meta"] and next(model.parameters()).device.type == "meta"


def test_unusable_device_fails_before_a_run_directory_exists(tmp_path, monkeypatch):
    """Asking for a GPU that is not there must not leave a run directory behind that blocks the retry; and a run
    saved with such a device resumes where the caller says (device is where a run trains, not what it is)."""
    import dataclasses

    from sparseforge.api import prepare_run_dir
    from sparseforge.errors import ConfigError
    from sparseforge.recipe import Recipe, RecipeRunner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = TrainConfig(model="smallcnn", epochs=1, batch_size=64, train_size=128, test_size=64, device="cuda")
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        train(cfg, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    rc = Recipe.from_dict({"model": "smallcnn", "dataset": "synthetic",
                           "train": {"train_size": 128, "test_size": 64, "batch_size": 64, "device": "cuda"},
                           "stage": [{"method": "finetune", "epochs": 1}]})
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        RecipeRunner(rc, tmp_path / "rr", progress=False).run()
    assert not (tmp_path / "rr").exists()
    prepare_run_dir(tmp_path / "s", cfg, resume=False)        # started elsewhere, on a GPU
    _, last = train(dataclasses.replace(cfg, device="cpu"), run_dir=tmp_path / "s", resume=True, progress=False)
    assert last["epoch"] == 1 and "test_acc" in last


def test_process_group_is_destroyed_at_exit(tmp_path, monkeypatch):
    """Under torchrun, init_from_env registers the group's teardown at exit: without it gloo's threads died with
    the interpreter and a rank aborted after finishing (SIGABRT), failing the job. One real one-process gloo
    group here: the registered handler destroys it."""
    import torch.distributed as dist

    import sparseforge.distributed as sd

    registered = []
    monkeypatch.setattr(sd.atexit, "register", registered.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert sd.init_from_env() == (0, 1) and not registered        # one process: no group, nothing to tear down
    monkeypatch.setenv("WORLD_SIZE", "2")
    real = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda backend: real(
        backend, init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1))
    try:
        sd.init_from_env()
        assert dist.is_initialized() and registered == [sd.shutdown]
        registered[0]()
        assert not dist.is_initialized()
        sd.shutdown()                                              # idempotent
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
