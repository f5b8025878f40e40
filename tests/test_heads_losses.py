import math

import pytest
import torch
from torch import nn

from cribo.pretrain.heads import DINOHead, WeightNormLinear
from cribo.pretrain.losses import CrossImageLoss, DINOLoss, ObjectLoss, cross_image_loss

# ----------------------------------------------------------------------------- plain-python references


def py_softmax(x, temp):
    m = max(x)
    e = [math.exp((v - m) / temp) for v in x]
    z = sum(e)
    return [v / z for v in e]


def py_H(teacher_logits, center, t_temp, student_logits, s_temp):
    """H(softmax((t - c) / tt), softmax(s / ts)) with plain floats."""
    p = py_softmax([t - c for t, c in zip(teacher_logits, center)], t_temp)
    q = py_softmax(student_logits, s_temp)
    return -sum(a * math.log(b) for a, b in zip(p, q))


# Tiny inputs: 2 images, K = 3 objects, L = 4 prototypes.
S1 = [[[0.0, 1.0, 2.0, 3.0], [1.0, -1.0, 0.5, 0.0], [0.3, 0.2, 0.1, 0.0]],
      [[2.0, 0.0, 0.0, 1.0], [-0.5, 0.5, 1.5, 0.0], [1.0, 1.0, -1.0, 0.0]]]
S2 = [[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 1.0, -1.0], [0.5, 0.5, 0.5, 2.0]],
      [[0.0, 0.0, 3.0, 1.0], [1.0, 2.0, 3.0, 4.0], [-2.0, 0.0, 2.0, 0.0]]]
T1 = [[[0.2, 0.1, 0.0, -0.1], [1.0, 0.0, 0.0, 0.0], [0.0, 0.3, 0.0, 0.1]],
      [[0.0, 0.0, 0.5, 0.5], [0.3, -0.3, 0.0, 0.1], [0.05, 0.0, 0.0, 0.2]]]
T2 = [[[0.0, 0.4, 0.0, 0.0], [-0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.4]],
      [[0.6, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0], [0.0, -0.4, 0.3, 0.0]]]
VALID = [[True, True, False], [True, True, True]]  # object (0, 2) is invalid
CENTER = [0.05, -0.02, 0.01, 0.0]


def tens(x):
    return torch.tensor(x, dtype=torch.float32)


# ----------------------------------------------------------------------------- heads


def test_head_shapes_and_state_dict_keys():
    h = DINOHead(in_dim=12, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(2, 5, 12)
    assert h.forward_global(x[:, 0]).shape == (2, 16)
    assert h.forward_object(x).shape == (2, 5, 16)
    assert set(h.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                   "mlp.4.bias", "last_layer_global.weight_v", "last_layer_object.weight_v"}
    free = DINOHead(in_dim=12, out_dim=16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert {"last_layer_global.weight_g", "last_layer_object.weight_g"} <= set(free.state_dict())
    assert isinstance(h.mlp[1], nn.GELU) and isinstance(h.mlp[3], nn.GELU)


def test_head_mlp_depth_and_bad_nlayers():
    h1 = DINOHead(in_dim=6, out_dim=8, hidden_dim=5, bottleneck_dim=3, nlayers=1)
    assert [type(m) for m in h1.mlp] == [nn.Linear]
    h4 = DINOHead(in_dim=6, out_dim=8, hidden_dim=5, bottleneck_dim=3, nlayers=4)
    assert sum(isinstance(m, nn.Linear) for m in h4.mlp) == 4
    with pytest.raises(ValueError, match="nlayers must be >= 1"):
        DINOHead(in_dim=6, nlayers=0)
    with pytest.raises(ValueError, match="input last dim is 7, expected in_dim=6"):
        h1.forward_object(torch.randn(2, 7))


def test_weight_norm_last_layer_equals_torch_weight_norm_with_unit_scale():
    torch.manual_seed(0)
    ours = WeightNormLinear(5, 9)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(5, 9, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.fill_(1.0)  # g
        ref.parametrizations.weight.original1.copy_(ours.weight_v * 3.0)  # v (scale must not matter)
    x = torch.randn(4, 5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.weight().norm(dim=1), torch.ones(9))


def test_head_outputs_are_cosines_and_last_layers_differ():
    torch.manual_seed(0)
    h = DINOHead(in_dim=10, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    x = torch.randn(6, 10)
    g, o = h.forward_global(x), h.forward_object(x)
    # unit-norm embedding times unit-norm rows: every logit is a cosine
    assert g.abs().max() <= 1 + 1e-6 and o.abs().max() <= 1 + 1e-6
    assert not torch.allclose(g, o)
    torch.testing.assert_close(g, h.last_layer_global(h.embed(x)))
    torch.testing.assert_close(h.embed(x).norm(dim=-1), torch.ones(6))


def test_head_init_matches_dino():
    torch.manual_seed(0)
    h = DINOHead(in_dim=384, out_dim=1024, hidden_dim=2048, bottleneck_dim=256)
    for lin in (m for m in h.mlp if isinstance(m, nn.Linear)):
        assert torch.all(lin.bias == 0)
        assert 0.019 < lin.weight.std().item() < 0.021
    # last layer keeps nn.Linear's default init: uniform(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(256)
    v = h.last_layer_object.weight_v
    assert v.abs().max() <= bound and v.abs().max() > 0.95 * bound


def test_shared_mlp_gets_object_gradient_but_global_layer_does_not():
    torch.manual_seed(0)
    h = DINOHead(in_dim=6, out_dim=8, hidden_dim=5, bottleneck_dim=3)
    h.forward_object(torch.randn(4, 6)).square().sum().backward()
    assert h.mlp[0].weight.grad is not None and h.mlp[0].weight.grad.abs().sum() > 0
    assert h.last_layer_object.weight_v.grad.abs().sum() > 0
    assert h.last_layer_global.weight_v.grad is None


def test_cancel_last_layer_gradients_freezes_last_layers_under_adamw():
    torch.manual_seed(0)
    h = DINOHead(in_dim=6, out_dim=8, hidden_dim=5, bottleneck_dim=3, norm_last_layer=False)
    opt = torch.optim.AdamW(h.parameters(), lr=0.1, weight_decay=0.5)
    before = {k: v.clone() for k, v in h.state_dict().items()}
    x = torch.randn(4, 6)
    (h.forward_global(x).sum() + h.forward_object(x).square().sum()).backward()
    h.cancel_last_layer_gradients()
    assert all(p.grad is None for p in h.last_layer_parameters())
    assert len(h.last_layer_parameters()) == 4  # v and g of both layers
    opt.step()
    after = h.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == k.startswith("mlp."), k


# ----------------------------------------------------------------------------- DINOLoss (L_cv^g)


def test_dino_loss_closed_form_uniform_teacher():
    # Teacher logits equal to the centre -> uniform teacher; student softmax = [1,1,1,2]/5.
    loss = DINOLoss(out_dim=4, student_temp=1.0)
    loss.center.copy_(tens([[0.3, -0.1, 0.2, 0.0]]))
    t = loss.center.expand(2, 4).clone()
    s = tens([[0.0, 0.0, 0.0, math.log(2.0)]] * 2)
    expected = math.log(5.0) - math.log(2.0) / 4  # -(1/4)(3 log(1/5) + log(2/5))
    assert loss(s, s, t, t, teacher_temp=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_equals_hand_computation():
    s1, s2, t1, t2 = (tens([img[0] for img in a]) for a in (S1, S2, T1, T2))  # (2, 4) each
    loss = DINOLoss(out_dim=4, student_temp=0.1)
    loss.center.copy_(tens([CENTER]))
    tt = 0.04
    h12 = [py_H(T1[b][0], CENTER, tt, S2[b][0], 0.1) for b in range(2)]
    h21 = [py_H(T2[b][0], CENTER, tt, S1[b][0], 0.1) for b in range(2)]
    expected = (sum(h12) / 2 + sum(h21) / 2) / 2
    assert loss(s1, s2, t1, t2, teacher_temp=tt).item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_centre_ema_exact_and_separate_from_forward():
    loss = DINOLoss(out_dim=4, center_momentum=0.9)
    t1 = tens([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    t2 = tens([[0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    loss(t1, t2, t1, t2, teacher_temp=0.04)
    assert torch.equal(loss.center, torch.zeros(1, 4))  # forward never moves the centre
    loss.update_center(t1, t2)  # batch mean over both views = [2, 2, 2, 2]
    torch.testing.assert_close(loss.center, tens([[0.2, 0.2, 0.2, 0.2]]), rtol=0, atol=1e-7)
    loss.update_center(t2, t2)  # batch mean [2, 2, 2, 2] again: 0.9 * 0.2 + 0.1 * 2
    torch.testing.assert_close(loss.center, tens([[0.38, 0.38, 0.38, 0.38]]), rtol=0, atol=1e-7)
    assert "center" in loss.state_dict()


def test_dino_loss_gradient_reaches_student_only_and_is_fp32():
    s1, s2 = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    t1, t2 = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    out = DINOLoss(out_dim=8)(s1.bfloat16(), s2.bfloat16(), t1, t2, teacher_temp=0.07)
    assert out.dtype == torch.float32
    out.backward()
    assert s1.grad is not None and t1.grad is None and t2.grad is None


@pytest.mark.parametrize("bad,match", [
    (dict(s2=torch.randn(3, 8)), "must share one shape"),
    (dict(s1=torch.randn(2, 5), s2=torch.randn(2, 5), t1=torch.randn(2, 5), t2=torch.randn(2, 5)),
     r"inputs must be \(B, 8\)"),
])
def test_dino_loss_rejects_bad_shapes(bad, match):
    args = dict(s1=torch.randn(2, 8), s2=torch.randn(2, 8), t1=torch.randn(2, 8), t2=torch.randn(2, 8))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        DINOLoss(out_dim=8)(**args, teacher_temp=0.04)
    with pytest.raises(ValueError, match="teacher_temp must be > 0"):
        DINOLoss(out_dim=8)(*(torch.randn(2, 8) for _ in range(4)), teacher_temp=0.0)


# ----------------------------------------------------------------------------- ObjectLoss (L_cv^o)


def test_object_loss_equals_hand_computation_and_ignores_invalid_objects():
    loss = ObjectLoss(out_dim=4, student_temp=0.1)
    loss.center.copy_(tens([CENTER]))
    s1, s2, t1, t2 = (tens(a) for a in (S1, S2, T1, T2))
    # The invalid object holds NaN everywhere: it must never be read.
    for x in (s1, s2, t1, t2):
        x[0, 2] = float("nan")
    tt = 0.05
    terms = [py_H(T1[b][k], CENTER, tt, S2[b][k], 0.1) + py_H(T2[b][k], CENTER, tt, S1[b][k], 0.1)
             for b in range(2) for k in range(3) if VALID[b][k]]
    expected = sum(terms) / (2 * len(terms))  # 5 valid objects
    out = loss(s1, s2, t1, t2, torch.tensor(VALID), teacher_temp=tt)
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_object_loss_no_valid_object_is_zero_and_backpropagates():
    s = torch.randn(2, 3, 4, requires_grad=True)
    out = ObjectLoss(out_dim=4)(s, s, s.detach(), s.detach(), torch.zeros(2, 3, dtype=torch.bool), 0.04)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_object_centre_uses_valid_teacher_objects_of_both_views():
    loss = ObjectLoss(out_dim=4, center_momentum=0.9)
    t1, t2 = tens(T1), tens(T2)
    t1[0, 2] = 1e6  # invalid: must not enter the mean
    valid = torch.tensor(VALID)
    rows = [T1[b][k] for b in range(2) for k in range(3) if VALID[b][k]] + \
           [T2[b][k] for b in range(2) for k in range(3) if VALID[b][k]]
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(4)]
    loss.update_center(t1, t2, valid)
    torch.testing.assert_close(loss.center, tens([[0.1 * m for m in mean]]), rtol=0, atol=1e-7)
    loss.update_center(t1, t2, torch.zeros(2, 3, dtype=torch.bool))  # nothing valid anywhere: unchanged
    torch.testing.assert_close(loss.center, tens([[0.1 * m for m in mean]]), rtol=0, atol=1e-7)


def test_object_loss_rejects_bad_valid_mask():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(2, 3\)"):
        ObjectLoss(out_dim=4)(x, x, x, x, torch.ones(2, 3), 0.04)
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(2, 3\)"):
        ObjectLoss(out_dim=4)(x, x, x, x, torch.ones(2, 2, dtype=torch.bool), 0.04)


# ----------------------------------------------------------------------------- cross_image_loss (L_ci^o)

OK1 = [[True, True, False], [True, False, False]]  # Z1 = 3
OK2 = [[False, False, False], [False, True, False]]  # Z2 = 1


def test_cross_image_loss_equals_hand_computation_with_z1_ne_z2():
    # teacher_nn1 = teacher projection of nn(c_1^k, M1): paired with the student's c_2^k (Eq. 8).
    s1, s2, n1, n2 = (tens(a) for a in (S1, S2, T1, T2))
    tt, ts = 0.06, 0.1
    sum1 = sum(py_H(T1[b][k], CENTER, tt, S2[b][k], ts) for b in range(2) for k in range(3) if OK1[b][k])
    sum2 = sum(py_H(T2[b][k], CENTER, tt, S1[b][k], ts) for b in range(2) for k in range(3) if OK2[b][k])
    out = cross_image_loss(s1, s2, n1, n2, torch.tensor(OK1), torch.tensor(OK2), teacher_temp=tt,
                           center=tens([CENTER]), student_temp=ts)
    assert isinstance(out, CrossImageLoss)
    assert out.z1.item() == 3 and out.z2.item() == 1
    assert out.loss.item() == pytest.approx((sum1 / 3 + sum2 / 1) / 2, rel=1e-5)
    # not the authors' quirk, which divides the second sum by Z1 as well
    assert out.loss.item() != pytest.approx((sum1 / 3 + sum2 / 3) / 2, rel=1e-3)


def test_cross_image_loss_empty_direction_contributes_zero():
    s1, s2, n1, n2 = (tens(a) for a in (S1, S2, T1, T2))
    ok1, none = torch.tensor(OK1), torch.zeros(2, 3, dtype=torch.bool)
    c = tens([CENTER])
    only1 = cross_image_loss(s1, s2, n1, n2, ok1, none, 0.06, c, 0.1)
    sum1 = sum(py_H(T1[b][k], CENTER, 0.06, S2[b][k], 0.1) for b in range(2) for k in range(3) if OK1[b][k])
    assert only1.z2.item() == 0
    assert only1.loss.item() == pytest.approx(sum1 / 3 / 2, rel=1e-5)
    # and Z1 = 0 does NOT drop direction 2 (the authors' code would)
    only2 = cross_image_loss(s1, s2, n1, n2, none, torch.tensor(OK2), 0.06, c, 0.1)
    assert only2.loss.item() > 0
    s = s1.clone().requires_grad_(True)
    nothing = cross_image_loss(s, s2, n1, n2, none, none, 0.06, c, 0.1)
    assert nothing.loss.item() == 0.0
    nothing.loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_cross_image_loss_ignores_targets_outside_the_cycle_mask():
    s1, s2, n1, n2 = (tens(a) for a in (S1, S2, T1, T2))
    ok1, ok2 = torch.tensor(OK1), torch.tensor(OK2)
    ref = cross_image_loss(s1, s2, n1, n2, ok1, ok2, 0.06, tens([CENTER]), 0.1).loss
    n1[~ok1] = float("nan")
    n2[~ok2] = float("nan")
    s2[~ok1 & ~ok2] = float("nan")
    assert torch.equal(cross_image_loss(s1, s2, n1, n2, ok1, ok2, 0.06, tens([CENTER]), 0.1).loss, ref)


def test_cross_image_loss_reference_normalisation_divides_both_sums_by_z1():
    s1, s2, n1, n2 = (tens(a) for a in (S1, S2, T1, T2))
    ok1, ok2, none = torch.tensor(OK1), torch.tensor(OK2), torch.zeros(2, 3, dtype=torch.bool)
    c = tens([CENTER])
    sum1 = sum(py_H(T1[b][k], CENTER, 0.06, S2[b][k], 0.1) for b in range(2) for k in range(3) if OK1[b][k])
    sum2 = sum(py_H(T2[b][k], CENTER, 0.06, S1[b][k], 0.1) for b in range(2) for k in range(3) if OK2[b][k])
    ref = cross_image_loss(s1, s2, n1, n2, ok1, ok2, 0.06, c, 0.1, normalisation="reference")
    assert ref.loss.item() == pytest.approx((sum1 + sum2) / 3 / 2, rel=1e-5)
    # Z1 = 0 drops direction 2 as well, with a zero gradient; Z2 = 0 agrees with the paper's form
    s = s1.clone().requires_grad_(True)
    dropped = cross_image_loss(s, s2, n1, n2, none, ok2, 0.06, c, 0.1, normalisation="reference")
    assert dropped.loss.item() == 0.0
    dropped.loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert torch.equal(cross_image_loss(s1, s2, n1, n2, ok1, none, 0.06, c, 0.1, normalisation="reference").loss,
                       cross_image_loss(s1, s2, n1, n2, ok1, none, 0.06, c, 0.1).loss)
    with pytest.raises(ValueError, match="normalisation 'z1' is unknown: choose one of paper, reference"):
        cross_image_loss(s1, s2, n1, n2, ok1, ok2, 0.06, c, 0.1, normalisation="z1")


def test_cross_image_loss_rejects_bad_inputs():
    x = torch.randn(2, 3, 4)
    ok = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ok2 must be a bool tensor"):
        cross_image_loss(x, x, x, x, ok, ok.float(), 0.04, torch.zeros(1, 4), 0.1)
    with pytest.raises(ValueError, match=r"center must be \(1, 4\)"):
        cross_image_loss(x, x, x, x, ok, ok, 0.04, torch.zeros(4), 0.1)


# ----------------------------------------------------------------------------- independent plain implementation


def plain_losses(s1, s2, t1, t2, valid, n1, n2, ok1, ok2, center_g, center_o, tt, ts):
    """Loop-based implementation of the three terms, written from the paper's equations (each / 2)."""
    def H(t, c, s):
        p = torch.softmax((t.double() - c.double()) / tt, dim=0)
        return -(p * torch.log_softmax(s.double() / ts, dim=0)).sum()

    B, K, _ = s1.shape
    g = sum(H(t1[b, 0], center_g[0], s2[b, 0]) + H(t2[b, 0], center_g[0], s1[b, 0]) for b in range(B)) / (2 * B)
    pairs = [(b, k) for b in range(B) for k in range(K) if valid[b, k]]
    o = sum(H(t1[b, k], center_o[0], s2[b, k]) + H(t2[b, k], center_o[0], s1[b, k])
            for b, k in pairs) / (2 * len(pairs))
    d1 = [(b, k) for b in range(B) for k in range(K) if ok1[b, k]]
    d2 = [(b, k) for b in range(B) for k in range(K) if ok2[b, k]]
    ci = 0.0
    if d1:
        ci = ci + sum(H(n1[b, k], center_o[0], s2[b, k]) for b, k in d1) / len(d1)
    if d2:
        ci = ci + sum(H(n2[b, k], center_o[0], s1[b, k]) for b, k in d2) / len(d2)
    return g, o, ci / 2


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("tt,ts", [(0.04, 0.1), (0.07, 0.1), (0.04, 0.2)])
def test_losses_match_plain_implementation(B, tt, ts):
    g = torch.Generator().manual_seed(100 * B + int(1000 * tt) + int(100 * ts))
    K, L = 4, 16
    s1, s2, t1, t2, n1, n2 = (torch.randn(B, K, L, generator=g) * 3 for _ in range(6))
    valid = torch.rand(B, K, generator=g) < 0.7
    valid[0, 0] = True
    ok1 = valid & (torch.rand(B, K, generator=g) < 0.5)
    ok2 = valid & (torch.rand(B, K, generator=g) < 0.5)
    cg, co = torch.randn(1, L, generator=g) * 0.1, torch.randn(1, L, generator=g) * 0.1
    glob, obj = DINOLoss(L, student_temp=ts), ObjectLoss(L, student_temp=ts)
    glob.center.copy_(cg)
    obj.center.copy_(co)
    ref_g, ref_o, ref_ci = plain_losses(s1, s2, t1, t2, valid, n1, n2, ok1, ok2, cg, co, tt, ts)
    got_g = glob(s1[:, 0], s2[:, 0], t1[:, 0], t2[:, 0], teacher_temp=tt)
    got_o = obj(s1, s2, t1, t2, valid, teacher_temp=tt)
    got_ci = cross_image_loss(s1, s2, n1, n2, ok1, ok2, tt, obj.center, ts).loss
    torch.testing.assert_close(got_g.double(), torch.as_tensor(ref_g, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_o.double(), torch.as_tensor(ref_o, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ci.double(), torch.as_tensor(ref_ci, dtype=torch.float64), rtol=1e-5, atol=1e-5)
