"""Distillation losses and regularisers against independent reference computations."""

import math

import pytest
import torch

from sparseforge import distill, regularize
from sparseforge.errors import SparseforgeError


def _fixed(n=6, c=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=dtype), torch.randn(n, c, generator=g, dtype=dtype),
            torch.randint(0, c, (n,), generator=g))


def test_kd_loss_matches_hand_computation():
    s, t, y = _fixed()
    T, alpha = 5.0, 0.9
    ps = [[math.exp(v / T) for v in row] for row in s.tolist()]
    pt = [[math.exp(v / T) for v in row] for row in t.tolist()]
    kl = 0.0
    for a, b in zip(pt, ps):
        za, zb = sum(a), sum(b)
        kl += sum((ai / za) * (math.log(ai / za) - math.log(bi / zb)) for ai, bi in zip(a, b))
    kl /= len(pt)                                          # batchmean
    ce = 0.0
    for row, k in zip(s.tolist(), y.tolist()):
        ce += -(row[k] - math.log(sum(math.exp(v) for v in row)))
    ce /= len(y)
    expect = alpha * T * T * kl + (1 - alpha) * ce
    assert float(distill.kd_loss(s, t, T, alpha, y)) == pytest.approx(expect, rel=1e-10)


def _pd(e):
    n = len(e)
    return [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]


def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_distance_and_angle_match_loops():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    ds, dt = _pd(s.tolist()), _pd(t.tolist())
    n = 5
    ms = sum(ds[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    mt = sum(dt[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    ref = sum(_huber(ds[i][j] / ms, dt[i][j] / mt) for i in range(n) for j in range(n)) / (n * n)
    assert float(distill.rkd_distance_loss(s, t)) == pytest.approx(ref, rel=1e-8)

    def cosang(e, i, j, k):
        a = [e[j][q] - e[i][q] for q in range(len(e[0]))]
        b = [e[k][q] - e[i][q] for q in range(len(e[0]))]
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        if na == 0 or nb == 0:
            return 0.0
        return sum(x * y for x, y in zip(a, b)) / (na * nb)

    S, Tt = s.tolist(), t.tolist()
    ref = sum(_huber(cosang(S, i, j, k), cosang(Tt, i, j, k)) for i in range(n) for j in range(n) for k in range(n))
    assert float(distill.rkd_angle_loss(s, t)) == pytest.approx(ref / n ** 3, rel=1e-8)


def test_graph_kd_matches_reference_and_guards_degrees():
    g = torch.Generator().manual_seed(2)
    s = [torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)]
    t = [torch.randn(4, 8, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)]

    def adj(f):
        f = f.reshape(len(f), -1).tolist()
        n = len(f)
        a = [[0.0 if i == j else sum(x * y for x, y in zip(f[i], f[j])) /
              (math.sqrt(sum(x * x for x in f[i])) * math.sqrt(sum(y * y for y in f[j]))) for j in range(n)]
             for i in range(n)]
        d = [sum(r) for r in a]
        inv = [1 / math.sqrt(v) if v > 0 else 0.0 for v in d]
        return [[inv[i] * a[i][j] * inv[j] for j in range(n)] for i in range(n)]

    ref = 0.0
    for a, b in zip(s, t):
        A, Bm = adj(a), adj(b)
        ref += sum((Bm[i][j] - A[i][j]) ** 2 for i in range(4) for j in range(4))
    assert float(distill.graph_kd_loss(s, t, weight=25.0)) == pytest.approx(25 * ref, rel=1e-8)
    # negative/zero degrees: anti-correlated features -> finite loss, no NaN
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.isfinite(distill.graph_kd_loss(f, f.flip(0)))


def test_gradients_by_gradcheck():
    s, t, y = _fixed(n=4, c=3)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: distill.kd_loss(a, t, 4.0, 0.7, y), (s,))
    e = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    et = torch.randn(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: distill.rkd_distance_loss(a, et), (e,))
    assert torch.autograd.gradcheck(lambda a: distill.rkd_angle_loss(a, et), (e,))
    assert torch.autograd.gradcheck(lambda a: distill.graph_kd_loss([a], [et]), (e,))
    l2 = torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: regularize.rdrop_loss(a, l2, y, 0.5), (s,))


def test_rdrop_matches_formula():
    a, b, y = _fixed()
    pa, pb = torch.softmax(a, 1), torch.softmax(b, 1)
    kl_ab = (pa * (pa.log() - pb.log())).sum(1).mean()
    kl_ba = (pb * (pb.log() - pa.log())).sum(1).mean()
    ce = torch.nn.functional.cross_entropy
    expect = ce(a, y) + ce(b, y) + 0.3 / 2 * (kl_ab + kl_ba)
    torch.testing.assert_close(regularize.rdrop_loss(a, b, y, 0.3), expect)


@pytest.mark.parametrize("n", [1, 7])
def test_hmix_endpoints_equal_mixup_and_cutmix(n):
    x = torch.randn(n, 3, 24, 40)
    y = torch.randint(0, 10, (n,))
    for lam in (0.0, 0.3, 0.77, 1.0):
        for fn, r in ((regularize.mixup, 0.0), (regularize.cutmix, 1.0)):
            a = regularize.hmix(x, y, lam, r, torch.Generator().manual_seed(3), num_classes=10)
            b = fn(x, y, lam, torch.Generator().manual_seed(3), num_classes=10)
            torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
            torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        xm, ym = regularize.hmix(x, y, lam, 0.5, torch.Generator().manual_seed(3), num_classes=10)
        assert xm.shape == x.shape and torch.allclose(ym.sum(1), torch.ones(n))


def test_mixup_and_cutmix_values():
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    y = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(2, generator=torch.Generator().manual_seed(0))
    xm, ym = regularize.mixup(x, y, 0.25, g, num_classes=2)
    torch.testing.assert_close(xm, 0.25 * x + 0.75 * x[perm])
    xc, yc = regularize.cutmix(x, y, 0.5, torch.Generator().manual_seed(5), num_classes=2)
    pasted = (xc != x).float().mean(dim=(1, 2, 3))         # share of pixels from the partner
    yt = torch.nn.functional.one_hot(y, 2).float()
    perm = torch.randperm(2, generator=torch.Generator().manual_seed(5))
    if perm.tolist() != [0, 1]:
        torch.testing.assert_close(yc, (1 - pasted[0]) * yt + pasted[0] * yt[perm])


def test_gmix_label_weight_is_mask_mean():
    x = torch.zeros(7, 3, 24, 40)
    x[torch.arange(7) % 2 == 1] = 1.0
    y = torch.arange(7) % 2
    out, yt = regularize.gmix(x, y, 0.6, torch.Generator().manual_seed(4), num_classes=2)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(4))
    i = next(k for k in range(7) if y[k] == 0 and y[perm[k]] == 1)   # image 0-valued, partner 1-valued
    m = out[i, 0]                                                    # = the Gaussian mask itself
    assert float(yt[i, 1]) == pytest.approx(float(m.mean()), rel=1e-6)
    assert 0 < float(m.mean()) < 0.6


def test_mixing_needs_num_classes_for_indices():
    with pytest.raises(SparseforgeError, match="num_classes"):
        regularize.mixup(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), 0.5)


def test_feature_taps_are_removed_and_teacher_has_no_grad():
    import copy
    import pickle

    import sparseforge as sf

    m = sf.create_model("resnet20")
    with distill.feature_taps(m, ["layer1", "layer3.2"]) as f:
        m(torch.randn(2, 3, 32, 32))
    assert f["layer1"].shape == (2, 16, 32, 32) and f["layer3.2"].shape == (2, 64, 8, 8)
    assert not any(mod._forward_hooks for mod in m.modules())
    pickle.dumps(copy.deepcopy(m))
    logits, feats = distill.Teacher(m, ("layer2",))(torch.randn(2, 3, 32, 32))
    assert not logits.requires_grad and feats[0].shape == (2, 32, 16, 16)
    with pytest.raises(SparseforgeError, match="no module named"):
        with distill.feature_taps(m, ["layer9"]):
            pass


def test_hint_loss_matches_formula_and_pulls_a_depth_pruned_student_to_its_teacher():
    import copy

    import sparseforge as sf

    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    t = [torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    ref = sum(float(((a - b) ** 2).sum() / (b ** 2).sum()) for a, b in zip(s, t))
    assert float(distill.hint_loss(s, t)) == pytest.approx(ref, rel=1e-12)
    assert float(distill.hint_loss(t, t)) == 0.0
    with pytest.raises(SparseforgeError, match="equal shapes"):
        distill.hint_loss([s[0]], [t[0][:, :2]])
    # a few steps of hints on a student with two residual branches dropped bring its stage outputs closer
    torch.manual_seed(0)
    teacher = sf.create_model("resnet20").eval()
    student = sf.prune(teacher, sf.DepthConfig(blocks=2, importance="bn"), example_input=torch.randn(1, 3, 32, 32))
    student.eval()       # BN statistics fixed: only the weights move
    taps = ["layer1", "layer2", "layer3"]
    x = torch.randn(16, 3, 32, 32)

    def gap():
        with torch.no_grad(), distill.feature_taps(student, taps) as fs, distill.feature_taps(teacher, taps) as ft:
            student(x)
            teacher(x)
            return float(distill.hint_loss([fs[p] for p in taps], [ft[p] for p in taps]))

    before = gap()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(25):
        with distill.feature_taps(student, taps) as fs, distill.feature_taps(teacher, taps) as ft:
            student(x)
            with torch.no_grad():
                teacher(x)
            loss = distill.hint_loss([fs[p] for p in taps], [ft[p] for p in taps])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = gap()
    assert after < 0.5 * before, (before, after)
    assert copy.deepcopy(student) is not None


def test_kd_feature_terms_need_hooks_before_the_forward():
    """Without on_train_begin the student's features were never recorded: a clear error, not a KeyError."""
    import sparseforge as sf
    from sparseforge.distill import KDCallback, KDConfig
    from sparseforge.train import Trainer, TrainConfig

    s, t = sf.create_model("resnet20"), sf.create_model("resnet20")
    kd = KDCallback(t, KDConfig(hint=1.0, taps=("layer1",)))
    tr = Trainer(s, TrainConfig(model="resnet20", threads=1), train_loader=None, callbacks=[kd], log=lambda m: None)
    with pytest.raises(SparseforgeError, match="on_train_begin"):
        tr.compute_loss(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    plain = KDCallback(t, KDConfig())         # logits only: installs what it needs lazily
    tr = Trainer(s, TrainConfig(model="resnet20", threads=1), train_loader=None, callbacks=[plain], log=lambda m: None)
    loss, _ = tr.compute_loss(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss)
