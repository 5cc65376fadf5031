"""Held-out bands of the support images (finetune.holdout): the threshold grid, which crops
are kept out, the early-stopping and refit contracts."""

import copy

import numpy as np
import pytest
import torch

from fsmeta.config import ConfigError, FinetuneConfig, load_config
from fsmeta.errors import FsmetaError
from fsmeta.data.crops import build_crop_index
from fsmeta.data.store import ImageSet
from fsmeta.finetune import CONTEXT_MARGIN, best_threshold, finetune, hold_out, hold_out_patches
from fsmeta.models import build_model, clone_state
from fsmeta.study import decision_threshold


def _set(images, masks):
    n = len(images)
    return ImageSet("toy", [f"i{k}" for k in range(n)], images, masks, ["train"] * n, [""] * n)


def test_best_threshold_by_hand():
    fg = np.zeros(100, np.int64)
    bg = np.zeros(100, np.int64)
    fg[[30, 70]] = [4, 6]  # 10 foreground pixels: 4 at p=0.30, 6 at p=0.70
    bg[[20, 50]] = [5, 3]  # 8 background pixels: 5 at 0.20, 3 at 0.50
    # t ≤ 0.20: 10/(10+8) = 0.556; 0.20 < t ≤ 0.30: 10/13 = 0.769; 0.30 < t ≤ 0.50: 6/(6+3+4) = 0.462;
    # 0.50 < t ≤ 0.70: 6/10 = 0.6. Best: every threshold in (0.20, 0.30]; the one nearest 0.5 is 0.30.
    iou, t = best_threshold(fg, bg)
    assert iou == pytest.approx(10 / 13) and t == pytest.approx(0.30)
    # the grid stays in [0.05, 0.95]: a best threshold of 0.99 is not reachable
    fg2 = np.zeros(100, np.int64)
    fg2[99] = 1
    bg2 = np.zeros(100, np.int64)
    bg2[[90, 96]] = 1  # t ≤ 0.90: 1/3; 0.90 < t ≤ 0.96: 1/2; above 0.96: 1, out of range
    assert best_threshold(fg2, bg2) == (pytest.approx(0.5), pytest.approx(0.91))


def test_hold_out_keeps_touching_crops_out_and_bands_hold_foreground():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (64, 48), dtype=np.uint8)
    mask = np.zeros((64, 48), np.uint8)
    mask[::5, ::3] = 1  # foreground everywhere
    empty = np.zeros((64, 48), np.uint8)
    empty[30:34, 20:24] = 1  # foreground only in the middle: no band of 16 px can hold it
    images = _set([img, img], [mask, empty])
    index = build_crop_index(images, 16, 8, min_foreground=1)
    held = hold_out(images, index, 0.25, seed=0)
    assert held is not None and len(held.bands) == 1  # the second image gives no band
    image_id, side, band = held.bands[0]
    assert image_id == "i0" and band == (16 if side in ("top", "bottom") else 12)
    h, w = 64, 48
    for r in range(len(index)):
        i, y0, x0 = int(index.image[r]), int(index.y[r]), int(index.x[r])
        touches = i == 0 and {"top": y0 < band, "bottom": y0 + 16 > h - band,
                              "left": x0 < band, "right": x0 + 16 > w - band}[side]
        assert (r in set(held.train_rows.tolist())) == (not touches)
    window, scored, band_mask = held.windows[0], held.scored[0], held.masks[0]
    along = 0 if side in ("top", "bottom") else 1
    assert window.shape[along] == band + CONTEXT_MARGIN and window.dtype == np.float32
    assert band_mask.shape[along] == band and band_mask.any()
    region = {"top": (slice(0, band), slice(None)), "bottom": (slice(h - band, h), slice(None)),
              "left": (slice(None), slice(0, band)), "right": (slice(None), slice(w - band, w))}[side]
    assert np.array_equal(window[scored], images.image(0)[region])  # the scored part is the band itself
    assert np.array_equal(band_mask, mask[region] > 0)
    again = hold_out(images, index, 0.25, seed=0)
    assert again.bands == held.bands and np.array_equal(again.train_rows, held.train_rows)  # seeded
    sides = {hold_out(images, index, 0.25, seed=s).bands[0][1] for s in range(12)}
    assert len(sides) > 1  # the side is drawn, not fixed
    assert hold_out(_set([img], [empty]), build_crop_index(_set([img], [empty]), 16, 8, 1), 0.25, seed=0) is None


def _support(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (48, 48), dtype=np.uint8)
    mask = (img > 150).astype(np.uint8)
    images = _set([img, img[::-1].copy()], [mask, mask[::-1].copy()])
    index = build_crop_index(images, 16, 8, min_foreground=1)
    from fsmeta.finetune import support_crops

    x, y = support_crops(images, index)
    return images, index, x, y


def test_finetune_with_holdout_ends_on_the_best_validation():
    images, index, x, y = _support()
    torch.manual_seed(0)
    base = build_model("fcrn")
    held = hold_out(images, index, 0.25, seed=1)
    cfg = FinetuneConfig(steps=6, batch_size=4, val_every=2, lr=1e-3)
    model, history = finetune(copy.deepcopy(base), x, y, cfg, seed=0, holdout=held)
    assert [s for s, _, _ in held.curve] == [2, 4, 6]
    best = max(held.curve, key=lambda c: c[1])  # the first of equal IoUs wins, as in finetune
    assert held.best_step == best[0] and held.iou == best[1] and held.threshold == best[2]
    assert held.score(model, None) == (pytest.approx(held.iou), pytest.approx(held.threshold))  # the kept weights
    # the steps up to the best validation, trained without validating, give the same weights
    plain, _ = finetune(copy.deepcopy(base), x[held.train_rows], y[held.train_rows],
                        FinetuneConfig(steps=held.best_step, batch_size=4, lr=1e-3), seed=0)
    for k, v in clone_state(plain).items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert decision_threshold(load_config(None, ["eval.threshold_rule=fixed"]), y, held) == held.threshold
    assert decision_threshold(load_config(None, ["eval.threshold_rule=fixed"]), y, None) == 0.5
    # chosen again with nothing dropped and no TTA, the bands give the same threshold and IoU
    assert held.calibrate(model, None) == (pytest.approx(held.iou), pytest.approx(held.threshold))


def test_patience_stops_early_and_refit_trains_every_crop_for_the_chosen_steps():
    images, index, x, y = _support()
    torch.manual_seed(0)
    base = build_model("fcrn")
    held = hold_out(images, index, 0.25, seed=1)
    held.score = lambda model, compute: (float(len(held.curve) == 0), 0.5)  # best at the first validation only
    seen = []
    model = copy.deepcopy(base)
    original = model.forward_with_latent
    model.forward_with_latent = lambda t: (seen.append(len(t)), original(t))[1]
    finetune(model, x, y, FinetuneConfig(steps=20, batch_size=4, val_every=2, patience=2), seed=0, holdout=held)
    assert [s for s, _, _ in held.curve] == [2, 4, 6] and held.best_step == 2
    assert len(seen) == 6  # stopped after two validations without improvement
    held2 = hold_out(images, index, 0.25, seed=1)
    held2.score = lambda model, compute: (float(len(held2.curve) == 1), 0.5)  # best at the second validation: step 4
    refit, _ = finetune(copy.deepcopy(base), x, y, FinetuneConfig(steps=8, batch_size=4, val_every=2, refit=True),
                        seed=0, holdout=held2)
    assert held2.best_step == 4
    every, _ = finetune(copy.deepcopy(base), x, y, FinetuneConfig(steps=4, batch_size=4), seed=0)
    for k, v in clone_state(every).items():
        assert torch.equal(v, refit.state_dict()[k]), k


@pytest.mark.parametrize("value", ["0.5", "-0.1"])
def test_holdout_range(value):
    with pytest.raises(ConfigError, match="finetune.holdout"):
        load_config(None, [f"finetune.holdout={value}"])


def _window_with_specks():
    """A 10×12 band window (rows 0–5 scored, 6–9 context) and its probabilities: object A (6 px,
    p 0.805), two background specks of 4 px and object B of 8 px (4 in the band, 4 in the context),
    all at p 0.355."""
    prob = np.zeros((10, 12), np.float32)
    prob[1:3, 1:4] = 0.805  # A
    prob[0:2, 6:8] = 0.355  # speck 1 (background)
    prob[4:6, 1:3] = 0.355  # speck 2 (background)
    prob[4:8, 9:11] = 0.355  # B: cut by the band's edge at row 6
    truth = np.zeros((10, 12), bool)
    truth[1:3, 1:4] = True
    truth[4:8, 9:11] = True
    from fsmeta.finetune import HeldOut

    held = HeldOut(np.arange(1), [np.zeros((10, 12), np.float32)], [truth[:6]], [(slice(0, 6), slice(None))], [("i0", "top", 6)])
    return held, prob


def test_calibrate_scores_the_bands_as_the_evaluation_does(monkeypatch):
    import fsmeta.evaluate
    from fsmeta.models import DihedralTTA

    held, prob = _window_with_specks()
    seen = []
    monkeypatch.setattr(fsmeta.evaluate, "predict_probability", lambda scorer, window, compute=None: (seen.append(scorer), prob)[1])
    model = build_model("fcrn")
    # Every object kept: t ≤ 0.35 predicts A, B's 4 band px and 8 speck px: 10 / 18 = 0.556; 0.35 < t ≤ 0.80
    # predicts A alone: 6 / 10 = 0.6 (the best; nearest the raw threshold 0.5 → 0.5).
    held.threshold = 0.5
    assert held.calibrate(model, None, min_size=0) == (pytest.approx(0.6), pytest.approx(0.5))
    # Objects under 5 px dropped: the specks go at every threshold, B (8 px over band and context) stays, so
    # t ≤ 0.35 scores 10 / 10; the one nearest the threshold before (0.5) is 0.35. (Labelled within the band
    # alone, B's 4 px would go with the specks and t ≤ 0.35 would score 6 / 10.)
    held.threshold, held.raw_threshold = 0.5, None
    assert held.calibrate(model, None, min_size=5) == (pytest.approx(1.0), pytest.approx(0.35))
    assert held.raw_threshold == 0.5 and held.summary()["holdout_raw_threshold"] == 0.5
    assert not any(isinstance(s, DihedralTTA) for s in seen)
    held.calibrate(model, None, min_size=5, tta=True)
    assert isinstance(seen[-1], DihedralTTA)  # eval.tta's predictor scores the bands too
    # A band where nothing scores: every threshold ties at 0, and the one chosen before stays.
    empty, _ = _window_with_specks()
    empty.masks = [np.zeros((6, 12), bool)]
    empty.threshold = 0.73
    assert empty.calibrate(model, None, min_size=5) == (0.0, pytest.approx(0.73))


def test_a_budget_per_shot_extends_the_same_run():
    """finetune.steps_per_shot raises the step budget to that many steps per support image; the
    longer run begins as the shorter one (same batches, constant rate), so its bands see the
    shorter run's validations first and can only choose a later step where it scores better."""
    images, index, x, y = _support()
    torch.manual_seed(0)
    base = build_model("fcrn")
    cfg = FinetuneConfig(steps=4, steps_per_shot=3, batch_size=4, val_every=2, lr=1e-3)
    assert [cfg.budget(k) for k in (0, 1, 2, 3)] == [4, 4, 6, 9]
    short, long = hold_out(images, index, 0.25, seed=1), hold_out(images, index, 0.25, seed=1)
    finetune(copy.deepcopy(base), x, y, cfg, seed=0, holdout=short)  # shots=0: finetune.steps alone
    finetune(copy.deepcopy(base), x, y, cfg, seed=0, holdout=long, shots=3)
    assert [s for s, _, _ in short.curve] == [2, 4] and [s for s, _, _ in long.curve] == [2, 4, 6, 8, 9]
    assert long.curve[:2] == short.curve
    seen = []
    model = copy.deepcopy(base)
    original = model.forward_with_latent
    model.forward_with_latent = lambda t: (seen.append(len(t)), original(t))[1]
    finetune(model, x, y, cfg, seed=0, shots=2)  # no bands: the whole budget
    assert len(seen) == 6
    assert FinetuneConfig(steps=0, steps_per_shot=3).budget(5) == 0  # epochs: no step budget


def _held(threshold):
    from fsmeta.finetune import HeldOut

    held = HeldOut(np.arange(1), [], [], [], [])
    held.threshold = threshold
    return held


def test_match_pool_by_hand():
    # A pool curve where the share predicted at threshold k/100 is 0.4 · 0.9^k (decreasing with k).
    curve = 0.4 * 0.9 ** np.arange(100)
    held = _held(0.60)
    # The support holds 1 % foreground: the pool is predicted that share where 0.4 · 0.9^k = 0.01,
    # k = ln(0.025) / ln(0.9) = 35.01 → bin 35. At the bands' 0.60 the pool's share is 0.4 · 0.9^60
    # = 7.19e-4, 0.0719 of the support's: more than 4× apart, so the bands' threshold stays.
    assert held.match_pool(0.01, curve) == pytest.approx(0.60)
    assert held.pool == pytest.approx({"pool_bands_threshold": 0.60, "pool_match_threshold": 0.35,
                                       "pool_ratio": 0.4 * 0.9 ** 60 / 0.01, "pool_used": 0.0})
    # A support of 0.1 %: matched at k = ln(0.0025) / ln(0.9) = 56.87 → 57; at 0.60 the ratio is 0.719,
    # within 4×: the threshold moves halfway, (60 + 57) // 2 = 58 → 0.58.
    held = _held(0.60)
    assert held.match_pool(0.001, curve) == pytest.approx(0.58)
    assert held.pool["pool_match_threshold"] == pytest.approx(0.57) and held.pool["pool_used"] == 1.0
    assert held.summary()["pool_used"] == 1.0 and held.summary()["holdout_threshold"] == pytest.approx(0.58)
    # The matched threshold stays in the grid [0.05, 0.95]: a support share above every pool share
    # (0.5 > 0.4 at k = 0) matches 0.05; at 0.10 the pool's share 0.139 is 0.28× the support's: used.
    held = _held(0.10)
    assert held.match_pool(0.5, curve) == pytest.approx(0.07)  # (10 + 5) // 2
    with pytest.raises(FsmetaError, match=r"foreground share must lie in \(0, 1\], got 0.0"):
        _held(0.5).match_pool(0.0, curve)
    with pytest.raises(FsmetaError, match=r"pool curve needs 100 bins, got shape \(50,\)"):
        _held(0.5).match_pool(0.1, curve[:50])


def test_pool_share_curve_counts_pixels_at_or_above_each_bin(monkeypatch):
    import fsmeta.evaluate
    from fsmeta.finetune import pool_share_curve

    probs = [np.array([[0.05, 0.30], [0.305, 0.99]], np.float32), np.array([[0.0, 0.5, 0.7, 1.0]], np.float32)]
    monkeypatch.setattr(fsmeta.evaluate, "predict_probability", lambda scorer, image, compute=None: image)
    curve = pool_share_curve(None, probs)
    # 8 pixels: bins 5, 30, 30, 99 and 0, 50, 70, 99 (1.0 falls in the last bin)
    assert curve[0] == 1.0 and curve[5] == pytest.approx(7 / 8) and curve[6] == pytest.approx(6 / 8)
    assert curve[30] == pytest.approx(6 / 8) and curve[31] == pytest.approx(4 / 8) and curve[51] == pytest.approx(3 / 8)
    assert curve[71] == pytest.approx(2 / 8) and curve[99] == pytest.approx(2 / 8)
    with pytest.raises(FsmetaError, match="no unannotated pool image"):
        pool_share_curve(None, [])


def test_unannotated_draw_leaves_out_the_support_and_is_seeded():
    from fsmeta.study import unannotated_draw

    pool = np.array([3, 5, 8, 9, 12, 20])
    drawn = unannotated_draw(pool, [5, 12], 3, seed=4)
    assert len(drawn) == 3 and set(drawn) <= {3, 8, 9, 20}
    assert np.array_equal(drawn, unannotated_draw(pool, [12, 5], 3, seed=4))
    assert sorted(unannotated_draw(pool, [5, 12], 10, seed=4)) == [3, 8, 9, 20]  # fewer when the pool has fewer
    assert len({tuple(unannotated_draw(pool, [], 3, seed=s)) for s in range(6)}) > 1  # the seed draws


def test_hold_out_patches_keeps_whole_foreground_patches_out_with_their_image_as_context():
    rng = np.random.default_rng(5)
    imgs = [rng.integers(0, 255, (96, 80), dtype=np.uint8) for _ in range(2)]
    masks = [np.zeros((96, 80), np.uint8) for _ in range(2)]
    masks[0][40:44, 40:44] = 1  # patch (0, 32, 32) holds foreground
    masks[1][0:3, 70:73] = 1  # patch (1, 0, 64) holds foreground, at the image's corner
    images = _set(imgs, masks)
    # ten 16² patches (rows 0..9); only rows 2 and 7 hold foreground
    patches = [(0, 0, 0, 16, 16), (0, 0, 16, 16, 16), (0, 32, 32, 16, 16), (0, 64, 0, 16, 16), (0, 80, 64, 16, 16),
               (1, 16, 16, 16, 16), (1, 32, 0, 16, 16), (1, 0, 64, 16, 16), (1, 48, 48, 16, 16), (1, 80, 0, 16, 16)]
    held = hold_out_patches(images, patches, 0.2, seed=0)  # round(0.2 × 10) = 2: both foreground patches
    assert held is not None and sorted(set(range(10)) - set(held.train_rows.tolist())) == [2, 7]
    assert [b[:2] for b in held.bands] == [("i0", "patch y32 x32"), ("i1", "patch y0 x64")]
    # row 2: a 16² patch at (32, 32) with 32 px of context on every side fits the 96×80 image whole
    win, (rows, cols) = held.windows[0], held.scored[0]
    assert win.shape == (16 + 2 * CONTEXT_MARGIN, 16 + 2 * CONTEXT_MARGIN) and (rows.start, cols.start) == (CONTEXT_MARGIN,) * 2
    np.testing.assert_array_equal(win[rows, cols], images.image(0)[32:48, 32:48])  # the patch, where the scored slice says
    np.testing.assert_array_equal(held.masks[0], masks[0][32:48, 32:48] > 0)
    # row 7 at the corner (0, 64) of an 80-wide image: context only below and to the left
    win, (rows, cols) = held.windows[1], held.scored[1]
    assert win.shape == (16 + CONTEXT_MARGIN, 16 + CONTEXT_MARGIN) and (rows.start, cols.start) == (0, CONTEXT_MARGIN)
    np.testing.assert_array_equal(held.masks[1], masks[1][0:16, 64:80] > 0)
    # a larger share still holds out only foreground patches; the same seed draws the same patches
    assert sorted(set(range(10)) - set(hold_out_patches(images, patches, 0.5, seed=3).train_rows.tolist())) == [2, 7]
    # one foreground patch of the two when the share allows one, the seed choosing which
    picked = {tuple(set(range(10)) - set(hold_out_patches(images, patches, 0.1, seed=s).train_rows.tolist())) for s in range(12)}
    assert picked == {(2,), (7,)}
    # nothing to hold out: one patch, a share that rounds to 0, no foreground in any patch
    assert hold_out_patches(images, patches[2:3], 0.9, seed=0) is None
    assert hold_out_patches(images, patches, 0.04, seed=0) is None
    assert hold_out_patches(images, [p for r, p in enumerate(patches) if r not in (2, 7)], 0.5, seed=0) is None
    # two patches at 0.9: one is held out, one trains
    held = hold_out_patches(images, [patches[2], patches[0]], 0.9, seed=0)
    assert held.train_rows.tolist() == [1]
