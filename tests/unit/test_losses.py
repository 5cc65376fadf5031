"""Loss terms checked against hand arithmetic and naive reference formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from fsmeta.losses import distillation, entropy_regulariser, weighted_bce

LOG2 = math.log(2.0)


def _t(rows, dtype=torch.float32):
    """(H, W) nested list -> (1, 1, H, W) tensor."""
    return torch.tensor(rows, dtype=dtype)[None, None]


# ---------------------------------------------------------------- weighted BCE


def test_weighted_bce_one_foreground_pixel_by_hand():
    # 2x2 mask, 1 fg, 3 bg -> w = 3/1 = 3. All logits 0 -> p = 0.5, every log term = -log 2.
    # Sum = 3*log2 (fg) + 3*log2 (three bg) = 6 log2; mean over 4 pixels = 1.5 log2.
    mask = _t([[1, 0], [0, 0]])
    assert weighted_bce(torch.zeros_like(mask), mask).item() == pytest.approx(1.5 * LOG2, rel=1e-6)

    # fg logit log 3 -> p = 0.75, fg term = -3 log 0.75; bg logits 0 -> 3 log 2. Mean over 4.
    logits = _t([[math.log(3.0), 0.0], [0.0, 0.0]])
    expected = (-3 * math.log(0.75) + 3 * LOG2) / 4
    assert weighted_bce(logits, mask).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_all_background_is_plain_bce():
    mask = torch.zeros(2, 1, 3, 3)
    assert weighted_bce(torch.zeros_like(mask), mask).item() == pytest.approx(LOG2, rel=1e-6)
    logits = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    expected = F.binary_cross_entropy_with_logits(logits, mask)
    torch.testing.assert_close(weighted_bce(logits, mask), expected)


def test_weighted_bce_all_foreground_gets_zero_weight():
    # #bg = 0 -> w = 0/4 = 0: the image contributes nothing, and nothing is inf/NaN.
    mask = torch.ones(1, 1, 2, 2)
    logits = torch.randn(1, 1, 2, 2, requires_grad=True)
    loss = weighted_bce(logits, mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(logits.grad == 0)


def test_weighted_bce_weights_per_image():
    # image 0: 1 fg of 4 -> w = 3, sum = 3 log2 + 3 log2 = 6 log2
    # image 1: 2 fg of 4 -> w = 1, sum = 4 log2
    # mean over 8 pixels = 10 log2 / 8 = 1.25 log2 (a batch-global w = 5/3 would give 1.5 log2)
    masks = torch.cat([_t([[1, 0], [0, 0]]), _t([[1, 1], [0, 0]])])
    loss = weighted_bce(torch.zeros_like(masks), masks)
    assert loss.item() == pytest.approx(1.25 * LOG2, rel=1e-6)


def test_weighted_bce_matches_naive_formula_and_accepts_uint8():
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)).requires_grad_()
    masks = (torch.rand(4, 1, 8, 8, generator=g) < 0.3).to(torch.uint8)
    masks[2] = 0  # one all-background image
    y = masks.double()
    n_fg = y.sum(dim=(1, 2, 3), keepdim=True)
    w = torch.where(n_fg > 0, (64 - n_fg) / n_fg.clamp_min(1), torch.ones_like(n_fg))
    p = torch.sigmoid(logits)
    naive = -(w * y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    loss = weighted_bce(logits, masks)
    torch.testing.assert_close(loss, naive)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_weighted_bce_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\).*\(1, 1, 3, 3\)"):
        weighted_bce(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 3))


# ---------------------------------------------------------------- entropy


def test_entropy_at_zero_logit():
    z = torch.zeros(2, 1, 3, 3)
    # p = 0.5: paper -p log p = 0.5 log 2; binary adds -(1-p) log(1-p) = 0.5 log 2 -> log 2
    assert entropy_regulariser(z).item() == pytest.approx(0.5 * LOG2, rel=1e-6)
    assert entropy_regulariser(z, "paper").item() == pytest.approx(0.5 * LOG2, rel=1e-6)
    assert entropy_regulariser(z, "binary").item() == pytest.approx(LOG2, rel=1e-6)


@pytest.mark.parametrize("form", ["paper", "binary"])
@pytest.mark.parametrize("value", [100.0, -100.0, 1e4, -1e4])
def test_entropy_saturated_logits_are_finite(form, value):
    z = torch.full((1, 1, 2, 2), value, requires_grad=True)
    h = entropy_regulariser(z, form)
    h.backward()
    assert torch.isfinite(h) and abs(h.item()) < 1e-30
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("form", ["paper", "binary"])
def test_entropy_matches_naive_formula(form):
    z = 4 * torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = torch.sigmoid(z)
    h = -p * torch.log(p)
    if form == "binary":
        h = h - (1 - p) * torch.log(1 - p)
    torch.testing.assert_close(entropy_regulariser(z, form), h.mean())


def test_entropy_unknown_form():
    with pytest.raises(ValueError, match=r"'shannon'.*paper.*binary"):
        entropy_regulariser(torch.zeros(1, 1, 2, 2), "shannon")


# ---------------------------------------------------------------- distillation


def _naive_distillation(a, b):
    total = 0.0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            total = total + ((a[i] - b[j]) ** 2).mean()
    return total / (a.shape[0] * b.shape[0])


def test_distillation_equals_double_loop():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, 5, 6, generator=g) + 2.0
    b = 0.5 * torch.randn(5, 4, 5, 6, generator=g) - 1.0
    expected = _naive_distillation(a.double(), b.double()).item()
    assert distillation(a, b).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_gradient_equals_double_loop():
    g = torch.Generator().manual_seed(4)
    a1 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    a2, b2 = a1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    distillation(a1, b1).backward()
    _naive_distillation(a2, b2).backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


def test_distillation_identical_latents_is_zero():
    x = torch.randn(1, 4, 3, 3)
    loss = distillation(x.expand(3, -1, -1, -1), x.expand(2, -1, -1, -1))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_is_symmetric():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    torch.testing.assert_close(distillation(a, b), distillation(b, a))


def test_distillation_is_independent_of_feature_size():
    # Constant latents 1 and 0: every squared difference is 1, so the loss is 1 at any size.
    for hw in (4, 16):
        loss = distillation(torch.ones(2, 3, hw, hw), torch.zeros(3, 3, hw, hw))
        assert loss.item() == pytest.approx(1.0)


def test_distillation_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 8, 8\)"):
        distillation(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8))


def test_prior_threshold_undoes_the_foreground_weight():
    from fsmeta.config import load_config
    from fsmeta.losses import prior_threshold
    from fsmeta.study import decision_threshold

    masks = torch.zeros(3, 1, 4, 4)
    masks[0, 0, :1, :] = 1  # 4 foreground, 12 background: w = 3
    masks[1, 0, :2, :] = 1  # 8 and 8: w = 1
    # crop 2 has no foreground and does not count; pooled w = (12 + 8) / (4 + 8) = 5/3, t = w / (1 + w) = 5/8
    assert prior_threshold(masks) == pytest.approx(5 / 8)
    assert prior_threshold(torch.zeros(2, 1, 4, 4)) == 0.5
    # The minimiser of weighted BCE for a constant prediction on one crop of foreground fraction f is
    # p_w = w f / (w f + 1 - f); at the prior threshold the decision is the unweighted one (p_w vs 0.5 at p = 1/2).
    w = 3.0
    p_w_at_half = w * 0.5 / (w * 0.5 + 0.5)
    assert prior_threshold(masks[:1]) == pytest.approx(p_w_at_half)
    assert decision_threshold(load_config(None, ["eval.threshold_rule=fixed", "eval.threshold=0.4"]), masks) == 0.4
    assert decision_threshold(load_config(None, ["eval.threshold_rule=prior"]), masks) == pytest.approx(5 / 8)
