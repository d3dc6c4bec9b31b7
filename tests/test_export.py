"""ONNX export of the folded model (dense, pattern-masked, structurally pruned), checked with onnxruntime."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.cli import main
from sparseforge.export import export_onnx
from sparseforge.models import save_weights

import onnxruntime as ort  # noqa: E402  (a test dependency)


def _bn_stats(m):
    torch.manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _run(onnx_bytes, x):
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("variant", ["dense", "pattern", "structured"])
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_onnx_matches_pytorch(name, variant):
    m = _bn_stats(sf.create_model(name))
    x = torch.randn(3, 3, 32, 32)
    if variant == "pattern":
        sf.prune(m, sf.PatternConfig(connectivity=3.6))
    elif variant == "structured":
        m = sf.prune(m, sf.StructuredConfig(mac_ratio=0.5), example_input=x[:1]).eval()
    with torch.no_grad():
        ref = m(x).numpy()
    out = _run(export_onnx(m, x[:1]), x)          # dynamic batch: exported at 1, run at 3
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_cli_export(tmp_path):
    m = _bn_stats(sf.create_model("resnet20"))
    sf.prune(m, sf.PatternConfig(connectivity=2.0))
    save_weights(m, tmp_path / "w.safetensors")
    assert main(["export", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x).numpy()
    out = _run((tmp_path / "m.onnx").read_bytes(), x)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
