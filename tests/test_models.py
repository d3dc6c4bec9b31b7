import pytest
import sparseforge as sf
import torch
from safetensors.torch import save_file

from sparseforge.errors import CheckpointError, SparseforgeError
from sparseforge.models import MODELS, create_model, load_weights

PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018}


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_and_runs(name):
    m = create_model(name, num_classes=7).eval()
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert m.sf_spec["name"] == name


@pytest.mark.parametrize("name,n", PARAMS.items())
def test_resnet_param_counts_match_he_et_al(name, n):
    assert sum(p.numel() for p in create_model(name).parameters()) == n


def test_vgg16_has_13_convs_and_one_classifier():
    m = create_model("vgg16")
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == 13 and all(c.kernel_size == (3, 3) for c in convs)
    assert isinstance(m.classifier, torch.nn.Linear)


def test_mobilenetv2_has_stride1_stem():
    m = create_model("mobilenetv2")
    stem = m.features[0][0]
    assert stem.stride == (1, 1)
    assert any(c.groups > 1 for c in m.modules() if isinstance(c, torch.nn.Conv2d))


def test_option_a_shortcut_shapes():
    m = create_model("resnet20")
    sc = m.layer2[0].shortcut
    x = torch.randn(1, 16, 32, 32)
    y = sc(x)
    assert y.shape == (1, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_unknown_model_name():
    with pytest.raises(SparseforgeError, match="unknown model 'resnet21'.*Did you mean"):
        create_model("resnet21")


def test_load_foreign_pt_with_module_prefix(tmp_path):
    src = create_model("resnet20")
    sd = {"module." + k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd, "best_prec1": 1.0}, tmp_path / "w.th")
    dst = load_weights(create_model("resnet20"), tmp_path / "w.th")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])


def test_load_safetensors_and_wrong_arch(tmp_path):
    save_file(create_model("resnet32").state_dict(), str(tmp_path / "r32.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit model resnet20.*unexpected keys"):
        load_weights(create_model("resnet20"), tmp_path / "r32.safetensors")


def test_truncated_and_garbage_files(tmp_path):
    save_file(create_model("resnet20").state_dict(), str(tmp_path / "a.safetensors"))
    blob = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(create_model("resnet20"), tmp_path / "t.safetensors")
    (tmp_path / "g.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(create_model("resnet20"), tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(create_model("resnet20"), tmp_path / "missing.pt")


def test_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_weights(create_model("resnet20"), tmp_path / "evil.pt")


def test_shared_akamaster_weights_load_strictly(models_dir):
    for depth in (20, 56):
        f = next(models_dir.glob(f"akamaster_resnet{depth}-*.th"))
        load_weights(create_model(f"resnet{depth}"), f)
    load_weights(create_model("resnet20"), models_dir / "resnet20-cifar10jpeg.safetensors")


# ---- ImageNet-size zoo: torchvision layouts ---------------------------------------------------------------------
TORCHVISION = {   # parameter counts of torchvision's models, and keys its state_dicts hold
    "resnet18": (11_689_512, 122, ["conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.bias"]),
    "resnet34": (21_797_672, 218, ["layer3.5.conv2.weight", "layer4.0.downsample.1.num_batches_tracked"]),
    "resnet50": (25_557_032, 320, ["layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "layer2.3.conv3.weight"]),
    "resnext50_32x4d": (25_028_904, 320, ["layer1.0.conv2.weight", "layer4.2.bn3.running_var", "fc.weight"]),
    "vgg16_bn": (138_365_992, 97, ["features.0.bias", "features.1.running_mean", "features.41.weight",
                                   "classifier.0.weight", "classifier.3.weight", "classifier.6.bias"]),
    "mobilenet_v2": (3_504_872, 314, ["features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                                      "features.2.conv.1.0.weight", "features.17.conv.3.running_var",
                                      "features.18.1.weight", "classifier.1.weight"]),
    "shufflenet_v2_x1_0": (2_278_604, 338, ["conv1.0.weight", "stage2.0.branch1.0.weight", "stage2.0.branch2.6.running_var",
                                            "stage3.7.branch2.3.weight", "stage4.3.branch2.5.weight",
                                            "conv5.1.running_mean", "fc.bias"]),
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_imagenet_zoo_has_torchvision_layout(name):
    params, n_keys, keys = TORCHVISION[name]
    m = sf.create_model(name)
    sd = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == params
    assert len(sd) == n_keys
    assert set(keys) <= set(sd)
    assert m.sf_spec["num_classes"] == 1000


def test_dilated_resnet_backbone_is_torchvisions():
    """``replace_stride_with_dilation`` as torchvision's (DeepLab's backbones): the same keys and parameters, the
    map kept at output stride 8 or 16, each dilated layer's first block on the previous dilation; basic-block
    ResNets and a wrong length are refused in one line."""
    m = sf.create_model("resnet50", replace_stride_with_dilation=(False, True, True)).eval()
    assert list(m.state_dict()) == list(sf.create_model("resnet50").state_dict())
    assert sum(p.numel() for p in m.parameters()) == TORCHVISION["resnet50"][0]
    convs = [(b.conv2.stride[0], b.conv2.dilation[0], b.conv2.padding[0]) for b in (*m.layer3, *m.layer4)]
    assert convs == [(1, 1, 1)] + [(1, 2, 2)] * 5 + [(1, 2, 2), (1, 4, 4), (1, 4, 4)]
    feats = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    with torch.inference_mode():
        assert feats(torch.randn(1, 3, 64, 64)).shape[2:] == (8, 8)
    m16 = sf.create_model("resnext50_32x4d", replace_stride_with_dilation=[False, False, True])
    assert m16.layer4[1].conv2.dilation == (2, 2) and m16.layer4[0].downsample[0].stride == (1, 1)
    with pytest.raises(SparseforgeError, match="3 booleans"):
        sf.create_model("resnet50", replace_stride_with_dilation=(True,))
    with pytest.raises(SparseforgeError, match="replace_stride_with_dilation"):
        sf.create_model("resnet18", replace_stride_with_dilation=(False, True, True))


# vgg16_bn (138 M parameters, 0.5 GB written twice) runs in the slow tier
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0",
                                  pytest.param("vgg16_bn", marks=pytest.mark.slow)])
def test_torchvision_state_dict_loads_strictly(name, tmp_path):
    """A plain torch.save(state_dict) under torchvision's key names (what a torchvision user has) loads strictly;
    a state_dict missing one key or with a renamed one is refused with the key named."""
    src = sf.create_model(name).eval()
    torch.save(src.state_dict(), tmp_path / "tv.pth")
    dst = sf.load_weights(sf.create_model(name).eval(), tmp_path / "tv.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(dst(x), src(x))
    sd = src.state_dict()
    key = next(k for k in sd if k.endswith("running_mean"))
    sd[key.replace("running_mean", "running_avg")] = sd.pop(key)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="running_avg"):
        sf.load_weights(sf.create_model(name), tmp_path / "bad.pth")


def test_load_model_rebuilds_a_saved_network_from_its_metadata(tmp_path):
    """load_model: a folded, pattern-pruned RepGhostNet 0.5x comes back as the same network (options, folded form,
    masks) with equal outputs; a state dict that does not say what it holds is refused in one line."""
    import sparseforge as sf
    from safetensors.torch import save_file

    from sparseforge.errors import CheckpointError
    from sparseforge.engine.testing import random_bn_statistics

    torch.manual_seed(0)
    m = random_bn_statistics(sf.create_model("repghostnet", width=0.5).eval(), torch.Generator().manual_seed(0))
    sf.reparameterize(m)
    sf.prune(m, sf.PatternConfig(num_patterns=4, connectivity=2.0))
    sf.models.save_weights(m, tmp_path / "m.safetensors")
    back = sf.load_model(tmp_path / "m.safetensors")
    assert not back.training and back.sf_spec["kwargs"] == {"width": 0.5}
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(back(x), m.eval()(x))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="does not say which model") as e:
        sf.load_model(tmp_path / "bare.safetensors")
    assert "\n" not in str(e.value)


def test_ghostnet_size_matches_the_paper_and_the_engine_runs_it_natively():
    """GhostNet 1.0x at 224: the paper's 141 M multiply-adds and 5.2 M parameters, the official module names; the
    concat-based Ghost module compiles without fallbacks and matches PyTorch (the RepGhost comparison's baseline)."""
    from sparseforge.engine.testing import random_bn_statistics
    from sparseforge.structured import count_macs
    m = sf.create_model("ghostnet", num_classes=1000, input_size=224).eval()
    assert 139e6 <= count_macs(m, torch.randn(1, 3, 224, 224)) <= 143e6
    assert 5.1e6 <= sum(p.numel() for p in m.parameters()) <= 5.3e6
    names = {n for n, _ in m.named_modules()}
    for official in ("conv_stem", "blocks.0.0.ghost1.primary_conv.0", "blocks.0.0.ghost1.cheap_operation.0",
                     "blocks.3.0.se.conv_reduce", "blocks.3.0.conv_dw", "blocks.3.0.shortcut.0", "conv_head",
                     "classifier"):
        assert official in names, official
    small = random_bn_statistics(sf.create_model("ghostnet", width=0.5).eval(), torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, 32)
    engine = sf.compile(small, x[:1], threads=1)
    with torch.no_grad():
        ref = small(x)
    assert float((engine(x) - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert all(op["native"] for op in engine.spec["ops"])
    assert any(op["describe"].startswith("concat") for op in engine.spec["ops"])
