import torch
import torch.nn as nn

from sparseforge.models import create_model
from sparseforge.report.stats import model_stats


def test_resnet20_macs_and_params():
    st = model_stats(create_model("resnet20"))
    assert st.total_params == 269_722
    # ResNet-20 on 32x32: ~40.6M MACs (He et al. report 41M FLOPs as multiply-adds)
    assert 40_000_000 < st.macs < 41_500_000
    conv1 = st.layers[0]
    assert conv1.name == "conv1" and conv1.macs == 32 * 32 * 16 * 3 * 9


def test_zero_fraction_and_effective_macs():
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].weight[0, 0, 1, 1] = 1.0
    st = model_stats(m, torch.zeros(2, 2, 5, 5))
    c = st.layers[0]
    assert c.params == 72 and c.nonzero == 1 and abs(c.sparsity - 71 / 72) < 1e-9
    assert c.macs == 2 * 25 * 72 and c.effective_macs == 2 * 25 * 1
    assert st.layers[1].macs == 2 * 100 * 3
    assert "| **total** |" in st.to_markdown()


def test_mask_buffer_counts_as_zero():
    conv = nn.Conv2d(1, 1, 3, bias=False)
    conv.register_buffer("weight_mask", torch.zeros_like(conv.weight))
    st = model_stats(nn.Sequential(conv), torch.zeros(1, 1, 5, 5))
    assert st.layers[0].nonzero == 0


def test_hooks_removed():
    m = create_model("resnet20")
    model_stats(m)
    assert all(not mod._forward_hooks for mod in m.modules())
