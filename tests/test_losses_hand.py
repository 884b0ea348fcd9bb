"""Each loss at a hand-checked input, and each method's ``loss()`` combining its terms with its configured weights."""
import math

import pytest
import torch

import zsad.methods as M
from zsad.modules.losses import binary_focal_loss, dice_loss, focal_loss, layered_focal_dice, patch_alignment_loss

EPS = 1e-5


def _focal_by_hand(p_true, gamma):
    """AnomalyCLIP's focal term for one pixel whose true class has probability p_true (2 classes): the one-hot is
    clamped to [eps, 1 - eps], so p_t = eps * (1 - p_true) + (1 - eps) * p_true, plus eps before the log."""
    pt = EPS * (1 - p_true) + (1 - EPS) * p_true + EPS
    return -((1 - pt) ** gamma) * math.log(pt)


def _two_pixels():
    # pixel a: (normal, abnormal) = (0.2, 0.8), target 1; pixel b: (0.6, 0.4), target 0
    probs = torch.tensor([[[[0.2, 0.6]], [[0.8, 0.4]]]], dtype=torch.float64)  # [1, 2, 1, 2]
    target = torch.tensor([[[1, 0]]])
    return probs, target


def test_focal_loss_by_hand():
    probs, target = _two_pixels()
    a, b = _focal_by_hand(0.8, 2.0), _focal_by_hand(0.6, 2.0)
    assert a == pytest.approx(0.0089252, abs=1e-7) and b == pytest.approx(0.0817267, abs=1e-7)
    assert float(focal_loss(probs, target, gamma=2.0)) == pytest.approx((a + b) / 2, rel=1e-12)
    assert float(focal_loss(probs, target, gamma=4.0)) == pytest.approx(
        (_focal_by_hand(0.8, 4.0) + _focal_by_hand(0.6, 4.0)) / 2, rel=1e-12)
    # balanced (Bayes-PFL): mean over fg pixels + mean over bg pixels; here one of each -> a + b
    assert float(focal_loss(probs, target, gamma=2.0, reduction="balanced")) == pytest.approx(a + b, rel=1e-12)
    probs3 = torch.cat([probs, torch.tensor([[[[0.5]], [[0.5]]]], dtype=torch.float64).expand(1, 2, 1, 1)], dim=-1)
    target3 = torch.tensor([[[1, 0, 0]]])
    c = _focal_by_hand(0.5, 2.0)
    assert float(focal_loss(probs3, target3, gamma=2.0, reduction="balanced")) == pytest.approx(a + (b + c) / 2,
                                                                                               rel=1e-12)


def test_dice_loss_by_hand():
    prob = torch.tensor([[[0.5, 1.0]], [[0.25, 0.0]]], dtype=torch.float64)  # [2, 1, 2]
    target = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)
    d1 = (2 * 0.5 + 1) / (1.5 + 1 + 1)  # image 1: overlap 0.5, |X| 1.5, |Y| 1
    d2 = (2 * 0.25 + 1) / (0.25 + 2 + 1)
    assert float(dice_loss(prob, target)) == pytest.approx(1 - (d1 + d2) / 2, rel=1e-12)
    pooled = (2 * 0.75 + 1e-5) / (1.75 + 3 + 1e-5)  # one dice over the batch (Bayes-PFL, smooth 1e-5)
    assert float(dice_loss(prob, target, smooth=1e-5, pooled=True)) == pytest.approx(1 - pooled, rel=1e-12)


def test_layered_focal_dice_sums_both_dice_terms_over_layers():
    probs, target = _two_pixels()
    layers = torch.stack([probs, probs.flip(1)], dim=1)  # [1, 2 layers, 2, 1, 2]; layer 2 swaps the classes
    focal, dice = layered_focal_dice(layers, target, gamma=2.0)
    f2 = (_focal_by_hand(0.2, 2.0) + _focal_by_hand(0.4, 2.0)) / 2
    assert float(focal) == pytest.approx((_focal_by_hand(0.8, 2.0) + _focal_by_hand(0.6, 2.0)) / 2 + f2, rel=1e-12)

    def one(p, t):  # dice loss of one image of two pixels, smooth 1
        return 1 - (2 * sum(a * b for a, b in zip(p, t, strict=True)) + 1) / (sum(p) + sum(t) + 1)

    want = (one([0.8, 0.4], [1, 0]) + one([0.2, 0.6], [0, 1])) + (one([0.2, 0.6], [1, 0]) + one([0.8, 0.4], [0, 1]))
    assert float(dice) == pytest.approx(want, rel=1e-12)


def test_binary_focal_loss_by_hand():
    prob = torch.tensor([[0.9, 0.3]], dtype=torch.float64)
    target = torch.tensor([[1, 0]])
    want = (_focal_by_hand(0.9, 4.0) + _focal_by_hand(0.7, 4.0)) / 2
    assert float(binary_focal_loss(prob, target, gamma=4.0)) == pytest.approx(want, rel=1e-12)


def _pal_all_pairs(z, mask):
    """max(0, mean cos over normal-anomalous pairs - mean cos over same-label pairs), ordered pairs within each
    image (self pairs included), pooled over the batch: the definition, pair by pair."""
    mixed, same, n_mixed, n_same = 0.0, 0.0, 0, 0
    for b in range(z.shape[0]):
        for i in range(z.shape[1]):
            for j in range(z.shape[1]):
                c = float(z[b, i] @ z[b, j])
                if mask[b, i] == mask[b, j]:
                    same, n_same = same + c, n_same + 1
                else:
                    mixed, n_mixed = mixed + c, n_mixed + 1
    return max(mixed / n_mixed - same / n_same, 0.0) if n_mixed else 0.0


@pytest.mark.parametrize("seed,n,d", [(0, 6, 5), (2, 4, 2), (7, 5, 3)])
def test_patch_alignment_loss_against_all_pairs(seed, n, d):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(2, n, d, generator=g, dtype=torch.float64), dim=-1)
    mask = (torch.rand(2, n, generator=g) > 0.5).double()
    want = _pal_all_pairs(z, mask)
    assert float(patch_alignment_loss(z, mask)) == pytest.approx(want, abs=1e-12)
    if seed == 2:
        assert want == pytest.approx(0.0339216, abs=1e-6)  # a case with the hinge active


def test_patch_alignment_loss_without_mixed_pairs_is_zero():
    z = torch.nn.functional.normalize(torch.randn(2, 4, 3, dtype=torch.float64), dim=-1)
    assert float(patch_alignment_loss(z, torch.ones(2, 4))) == 0.0


# == each method's loss(): its terms combined with its configured weights ==========================================
def _batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 224, 224)
    mask[0, 40:120, 60:150] = 1.0
    return {"image": torch.randn(2, 3, 224, 224, generator=g), "label": torch.tensor([1, 0]), "mask": mask}


WEIGHTED = {  # method -> (config overrides with weights != 1, total from the returned terms)
    "anomalyclip": ({"loss": {"seg_weight": 3.0}}, lambda t: t["image_ce"] + 3.0 * (t["focal"] + t["dice"])),
    "bagclip": ({"loss": {"seg_weight": 3.0}}, lambda t: t["image_ce"] + 3.0 * (t["focal"] + t["dice"])),
    "sowa": ({"loss": {"seg_weight": 3.0}}, lambda t: t["image_ce"] + 3.0 * (t["focal"] + t["dice"])),
    "afclip": ({"loss": {"seg_weight": 3.0, "pal_weight": 0.5}},
               lambda t: t["cls_focal"] + 3.0 * (t["seg_focal"] + t["seg_l1"]) + 0.5 * t["pal"]),
    "bayespfl": ({"loss": {"kl_weight": 0.3, "ort_weight": 0.7}},
                 lambda t: t["image_ce"] + t["focal"] + t["dice"] + 0.3 * t["kl"] + 0.7 * t["ort"]),
}


@pytest.mark.parametrize("name", sorted(WEIGHTED))
def test_method_loss_applies_its_weights(name):
    overrides, combine = WEIGHTED[name]
    m = M.create(name, "tiny", **overrides).train()
    torch.manual_seed(0)
    terms = m.loss(_batch())
    assert all(float(v.detach()) > 0 for v in terms.values()), terms  # every term present and active in this batch
    assert float(terms["total"].detach()) == pytest.approx(float(combine(terms)), rel=1e-5)


def test_anomalyclip_terms_by_the_formula():
    """AnomalyCLIP's image term is the CE of cos(g, t)/T against the label, the focal term is summed over taps."""
    m = M.create("anomalyclip", "tiny").train()
    batch = _batch()
    terms = m.loss(batch)
    with torch.no_grad():
        g, taps = m.encode(batch["image"])
        text = m.prompts(m.backbone)
        logits = torch.nn.functional.normalize(g, dim=-1) @ text.t() / m.config.temperature
        want_ce = -torch.log_softmax(logits, -1)[torch.arange(2), batch["label"]].mean()
    assert float(terms["image_ce"]) == pytest.approx(float(want_ce), rel=1e-5)
    assert len(m.config.taps) == 4 and float(terms["dice"]) > 4 * 0.5  # 2 dice terms per tap, each in (0, 1)
