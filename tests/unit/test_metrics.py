"""Metrics on hand-made masks with hand-computed answers."""

import numpy as np
import pytest

from fsmeta.metrics import (
    InstanceStats,
    binarize,
    confusion,
    evaluate_image,
    instance_matching,
    instance_stats_total,
    iou,
    mean_iou,
    pooled_iou,
    summarize,
)

EPS = 1e-4


def _mask(shape, *boxes):
    """Bool mask with the given (r0, r1, c0, c1) half-open boxes set."""
    m = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


def test_binarize_is_inclusive():
    np.testing.assert_array_equal(binarize(np.array([0.2, 0.5, 0.9])), [False, True, True])
    np.testing.assert_array_equal(binarize(np.array([0.2, 0.5, 0.9]), 0.6), [False, False, True])


def test_overlapping_squares():
    # P = rows 0-3 x cols 0-3 (16 px), G = rows 2-5 x cols 2-5 (16 px) in 10x10.
    # P∩G = rows 2-3 x cols 2-3 = 4; fp = 12, fn = 12; union = 28; tn = 100 - 28 = 72.
    p, g = _mask((10, 10), (0, 4, 0, 4)), _mask((10, 10), (2, 6, 2, 6))
    c = confusion(p, g)
    assert (c.tp, c.fp, c.fn, c.tn) == (4, 12, 12, 72)
    assert iou(p, g) == pytest.approx((4 + EPS) / (28 + EPS))
    # any nonzero dtype counts as foreground
    assert iou(p.astype(np.uint8), g.astype(np.float32)) == pytest.approx((4 + EPS) / (28 + EPS))


def test_iou_empty_cases():
    empty, gt = np.zeros((5, 5), bool), _mask((5, 5), (0, 2, 0, 3))  # gt has n = 6 px
    assert iou(empty, empty) == 1.0
    assert iou(empty, gt) == pytest.approx(EPS / (6 + EPS))
    assert iou(empty, gt) < 1e-4


def test_mean_iou_and_pooled_iou_differ():
    # tiny image: gt 1 px, pred empty -> IoU = eps / (1 + eps) ≈ 1e-4, counts tp 0, fp 0, fn 1
    # big image: gt = pred = 50 px -> IoU = 1, counts tp 50, fp 0, fn 0
    # mIoU = (eps/(1+eps) + 1) / 2 ≈ 0.5;  pooled = 50 / (50 + 0 + 1) = 50/51 ≈ 0.98
    small_gt, small_pred = _mask((10, 10), (0, 1, 0, 1)), np.zeros((10, 10), bool)
    big = _mask((10, 10), (0, 5, 0, 10))
    preds, gts = [small_pred, big], [small_gt, big]
    assert mean_iou(preds, gts) == pytest.approx((EPS / (1 + EPS) + 1) / 2)
    assert pooled_iou(preds, gts) == pytest.approx(50 / 51)
    assert pooled_iou([small_pred], [small_pred]) == 1.0  # 0/0 -> 1


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        iou(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 2\)"):
        instance_matching(np.zeros((3, 3)), np.zeros((2, 2)))


def test_instance_matching_three_blobs():
    shape = (20, 20)
    gt = _mask(shape,
               (1, 5, 1, 5),      # A: 4x4 = 16 px
               (1, 5, 8, 12),     # B: 4x4 = 16 px, cols 8-11
               (10, 14, 1, 5))    # C: 16 px, never predicted
    pred = _mask(shape,
                 (1, 5, 1, 4),    # on A: 4x3 = 12 px inside A -> IoU 12/16 = 0.75 > 0.5: match
                 (1, 5, 11, 13),  # on B: 8 px, overlap col 11 = 4 -> IoU 4/(16+8-4) = 0.2
                 (10, 13, 10, 13))  # false positive: 9 px far from any gt
    # tp = 1 (A); fp = 2 (B's poor pred, the FP blob); fn = 2 (B, C)
    s = instance_matching(pred, gt)
    assert (s.tp, s.fp, s.fn) == (1, 2, 2)
    assert s.precision == pytest.approx(1 / 3)
    assert s.recall == pytest.approx(1 / 3)
    assert s.f1 == pytest.approx(2 / (2 + 2 + 2))


def test_instance_matching_threshold_is_strict():
    gt = _mask((6, 6), (0, 2, 0, 2))    # 4 px
    pred = _mask((6, 6), (0, 2, 0, 1))  # 2 px inside -> IoU = 2/4 = 0.5, not > 0.5
    s = instance_matching(pred, gt)
    assert (s.tp, s.fp, s.fn) == (0, 1, 1)
    assert instance_matching(pred, gt, iou_threshold=0.4).tp == 1


def test_diagonal_touching_squares_are_one_object():
    # [0:2, 0:2] and [2:4, 2:4] touch only at the corner (1,1)-(2,2)
    two = _mask((6, 6), (0, 2, 0, 2), (2, 4, 2, 4))
    one_square = _mask((6, 6), (0, 2, 0, 2))
    s = instance_matching(two, two)
    assert (s.tp, s.fp, s.fn) == (1, 0, 0)  # 8-connectivity: a single component
    assert instance_matching(two, two, connectivity=1).tp == 2  # 4-connectivity: two
    # pred = one square vs gt = the 8-connected pair: IoU = 4/8 = 0.5, not matched
    assert (instance_matching(one_square, two).tp, instance_matching(one_square, two).fn) == (0, 1)


def test_instance_scores_with_no_objects_are_one():
    empty = np.zeros((4, 4), bool)
    assert instance_matching(empty, empty) == InstanceStats(0, 0, 0, 1.0, 1.0, 1.0)
    s = instance_matching(empty, _mask((4, 4), (0, 1, 0, 1)))
    assert (s.tp, s.fp, s.fn, s.precision, s.recall, s.f1) == (0, 0, 1, 1.0, 0.0, 0.0)


def test_instance_stats_total_pools_counts():
    a, b = InstanceStats.from_counts(3, 1, 0), InstanceStats.from_counts(0, 0, 4)
    t = instance_stats_total([a, b])
    # tp 3, fp 1, fn 4 -> P = 3/4, R = 3/7, F1 = 6/11
    assert (t.tp, t.fp, t.fn) == (3, 1, 4)
    assert (t.precision, t.recall, t.f1) == pytest.approx((3 / 4, 3 / 7, 6 / 11))


def test_evaluate_and_summarize_two_images():
    # Image 1 (6x6): gt rows 0-1 x cols 0-1 (4 px); prob 0.9 on rows 0-1 x cols 0-2 (6 px)
    # plus 0.6 at (5, 0). pred = 7 px: tp 4, fp 3, fn 0, tn 29; IoU (4+eps)/(7+eps).
    # Objects: pred {6 px blob, 1 px blob}, gt {4 px}: 4/6 > 0.5 -> inst tp 1, fp 1, fn 0.
    prob1 = np.full((6, 6), 0.1)
    prob1[0:2, 0:3] = 0.9
    prob1[5, 0] = 0.6
    gt1 = _mask((6, 6), (0, 2, 0, 2))
    # Image 2 (6x6): gt A rows 0-1 x cols 0-1, B rows 4-5 x cols 4-5 (4 px each).
    # prob 0.7 exactly on A, 0.5 (= threshold, included) at (4, 4). pred = 5 px:
    # tp 5, fp 0, fn 3, tn 28; IoU (5+eps)/(8+eps). A matches (IoU 1); (4,4) vs B = 1/4:
    # inst tp 1, fp 1, fn 1.
    prob2 = np.zeros((6, 6))
    prob2[0:2, 0:2] = 0.7
    prob2[4, 4] = 0.5
    gt2 = _mask((6, 6), (0, 2, 0, 2), (4, 6, 4, 6)).astype(np.uint8)

    r1, r2 = evaluate_image(prob1, gt1), evaluate_image(prob2, gt2)
    assert {k: v for k, v in r1.items() if k != "iou"} == dict(
        tp=4, fp=3, fn=0, tn=29, inst_tp=1, inst_fp=1, inst_fn=0)
    assert {k: v for k, v in r2.items() if k != "iou"} == dict(
        tp=5, fp=0, fn=3, tn=28, inst_tp=1, inst_fp=1, inst_fn=1)
    assert r1["iou"] == pytest.approx((4 + EPS) / (7 + EPS))
    assert r2["iou"] == pytest.approx((5 + EPS) / (8 + EPS))

    s = summarize([r1, r2])
    # pixels pooled: tp 9, fp 3, fn 3 -> 9/15; objects pooled: tp 2, fp 2, fn 1
    # -> P = 2/4, R = 2/3, F1 = 4/(4+2+1) = 4/7
    assert s["miou"] == pytest.approx(((4 + EPS) / (7 + EPS) + (5 + EPS) / (8 + EPS)) / 2)
    assert s["pooled_iou"] == pytest.approx(9 / 15)
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((0.5, 2 / 3, 4 / 7))
    assert s["n_images"] == 2
    assert set(s) == {"miou", "pooled_iou", "precision", "recall", "f1", "n_images"}
