"""Low precision: power-of-two rounding, STE, fake-quant levels, the precision schedule, robustness estimate."""

import copy
import pickle

import pytest
import torch
import torch.nn as nn

import sparseforge as sf
from sparseforge.lowbit import (FQConv2d, Pow2Conv2d, ProgressivePrecisionCallback, ProgressivePrecisionConfig,
                                apply_pow2, fake_quant, fold_lowbit, plateaued, pow2_round,
                                pow2_storage)
from sparseforge.report import lipschitz


def test_pow2_coefficients_are_signed_powers_of_two_in_range_with_edges():
    c = torch.tensor([0.0, 3.9e-3, 4e-3, -4e-3, 0.3, -0.74, 1.0, 5.0, -100.0, 1e-6, 0.0059, 0.0061])
    q = pow2_round(c, k_min=-8, k_max=0, delta=4e-3)
    nz = q[q != 0]
    k = torch.log2(nz.abs())
    assert torch.equal(k, k.round()) and bool((k >= -8).all() and (k <= 0).all())
    assert q[1] == 0 and q[9] == 0                      # below delta -> 0
    assert q[2] == 2.0 ** -8 and q[3] == -(2.0 ** -8)    # at delta: kept, rounded (log2 4e-3 = -7.97 -> -8)
    assert q[7] == 1.0 and q[8] == -1.0                 # clipped at k_max
    assert q[4] == 0.25 and q[5] == -1.0                # log2 .3 = -1.74 -> -2 ; log2 .74 = -0.43 -> 0
    with pytest.raises(sf.SparseforgeError, match="k_min"):
        sf.Pow2Config(k_min=1, k_max=0)


def test_pow2_conv_reconstructs_trains_with_ste_and_folds():
    torch.manual_seed(0)
    m = sf.create_model("resnet20")
    sf.prune(m, sf.PatternConfig(connectivity=2.0))
    apply_pow2(m, sf.Pow2Config())
    convs = [mod for mod in m.modules() if isinstance(mod, Pow2Conv2d)]
    assert convs and not isinstance(m.conv1, Pow2Conv2d)
    q = convs[0].quantized_coeff()
    nz = q[q != 0]
    assert torch.equal(torch.log2(nz.abs()), torch.log2(nz.abs()).round())
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    assert convs[0].coeff.grad is not None and float(convs[0].coeff.grad.abs().sum()) > 0   # STE passes gradients
    w = convs[0].effective_weight()
    assert bool((w[convs[0].weight_mask == 0] == 0).all())                              # pattern mask respected
    st = pow2_storage(m)
    assert st["pow2"] < st["fp32"] / 4
    pickle.dumps(copy.deepcopy(m))
    m.eval()
    with torch.no_grad():
        ref = m(x)
        fold_lowbit(m)
        assert not any(isinstance(mod, Pow2Conv2d) for mod in m.modules())
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_has_exactly_2_to_the_b_levels(bits):
    x = torch.linspace(-3, 5, 10000)
    q = fake_quant(x, bits)
    assert len(torch.unique(q)) == 2 ** bits
    assert float((q - x).abs().max()) <= (8 / (2 ** bits - 1)) / 2 + 1e-5


def test_gradients_are_quantised_on_the_way_back():
    conv = FQConv2d.from_conv(nn.Conv2d(3, 4, 3))
    conv.bits, conv.gbits = 8, 2
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    conv(x).pow(2).sum().backward()
    assert len(torch.unique(x.grad)) <= 4


def test_schedule_switches_on_a_crafted_curve_and_not_before():
    cfg = ProgressivePrecisionConfig(window=5, epsilon=0.1, period=1)
    cb = ProgressivePrecisionCallback(cfg, macs_per_image=1000)
    curve = [2.0, 1.6, 1.3, 1.1, 1.0, 0.95, 0.93, 0.92]    # scale 2.0: plateau = range of 5 < 0.2
    stages = []
    for v in curve:
        cb.observe(v)
        stages.append(cb.stage)
    # windows: [2,1.6,1.3,1.1,1.0] range 1.0; [1.6..0.95] 0.65; [1.3..0.93] 0.37; [1.1,1,.95,.93,.92] 0.18 -> switch
    assert stages == [0, 0, 0, 0, 0, 0, 0, 1]
    assert not plateaued([1.0, 1.0, 1.0, 1.0], 5, 0.1, 1.0)
    assert plateaued([1.0] * 5, 5, 0.1, 1.0)


def test_bitops_saving_vs_fixed_8bit():
    cfg = ProgressivePrecisionConfig(forward_bits=(4,), grad_bits=(8,), period=10)
    cb = ProgressivePrecisionCallback(cfg, macs_per_image=100)
    cb.on_loss(None, torch.tensor(1.0), None, torch.zeros(4, 3, 8, 8), None)
    # (4*4 + 2*8*4) / (8*8 + 2*8*8) = 80 / 192
    assert cb.saved() == pytest.approx(1 - 80 / 192)


def test_robustness_estimate_of_a_linear_model_equals_its_analytic_value():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12))
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 12))
    with torch.no_grad():
        lin[1].weight.copy_(2.5 * q)       # every singular value 2.5: ||W d|| / ||d|| = 2.5 for any d
    x = torch.randn(16, 3, 2, 2)
    est = lipschitz(lin, x, eps_values=(0.01, 0.1, 1.0), on="logits")
    for v in est.values():
        assert v == pytest.approx(2.5, rel=1e-4)
    soft = lipschitz(lin, x, eps_values=(0.01,))
    assert 0 < soft[0.01] <= 2.5 * 0.5 + 1e-6    # softmax is 1/2-Lipschitz in L2... bounded above


def test_low_precision_layers_keep_fp32_arithmetic_under_bf16_training():
    """TrainConfig.precision='bf16' autocasts the forward; the simulated grids must not be rounded by it."""
    from sparseforge.lowbit import Pow2Config, Pow2Conv2d

    torch.manual_seed(0)
    fq = FQConv2d.from_conv(nn.Conv2d(3, 4, 3))
    fq.bits, fq.gbits = 6, 8
    p2 = Pow2Conv2d.from_conv(nn.Conv2d(3, 4, 3), Pow2Config())
    x = torch.randn(2, 3, 6, 6)
    for layer in (fq, p2):
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x.bfloat16())
            plain = nn.functional.conv2d(x, torch.randn(4, 3, 3, 3))
        assert plain.dtype == torch.bfloat16          # autocast is really on around the layer
        assert got.dtype == torch.float32 and torch.allclose(got, layer(x.bfloat16().float()), atol=0, rtol=0)
        assert torch.allclose(ref, layer(x), atol=0, rtol=0)
