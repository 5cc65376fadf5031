"""Small predicted objects dropped by the support's own object size (eval.min_size_fraction)."""

from pathlib import Path

import numpy as np
import pytest

from fsmeta.config import Config, changed_keys, load_config
from fsmeta.metrics import drop_small, evaluate_image, median_object_area
from fsmeta.study import min_object_size, support_masks

ROOT = Path(__file__).resolve().parents[2]


def _mask():
    m = np.zeros((12, 12), bool)
    m[1:4, 1:4] = True  # 9 px
    m[8, 8] = m[9, 9] = True  # 2 px, diagonal: one 8-connected object
    m[1, 10] = True  # 1 px
    return m


def test_drop_small_by_hand():
    m = _mask()
    assert drop_small(m, 0).sum() == drop_small(m, 1).sum() == 12
    kept = drop_small(m, 2)
    assert kept.sum() == 11 and not kept[1, 10] and kept[8, 8] and kept[9, 9]
    assert drop_small(m, 3).sum() == 9 and drop_small(m, 10).sum() == 0
    assert drop_small(np.zeros((4, 4), bool), 5).sum() == 0


def test_median_object_area_and_the_size_a_support_sets():
    other = np.zeros((6, 6), np.uint8)
    other[0:2, 0:2] = 255  # 4 px
    assert median_object_area([_mask(), other]) == 3.0  # areas 9, 2, 1, 4
    assert median_object_area([np.zeros((3, 3))]) == 0.0
    big = np.zeros((20, 20), bool)
    big[0:4, 0:4] = big[10:14, 10:14] = True  # 16, 16
    big[18, 0] = True  # 1
    cfg = Config()
    assert cfg.eval.min_size_fraction == 0.25
    assert min_object_size(cfg, [big]) == 4  # a quarter of the median, 16
    cfg.eval.min_size_fraction = 0.0
    assert min_object_size(cfg, [big]) == 0


def test_support_masks_are_the_annotated_windows():
    class T:
        masks = [np.arange(20).reshape(4, 5)]

    (w,) = support_masks(T(), [(0, 1, 2, 2, 3)])
    assert w.tolist() == [[7, 8, 9], [12, 13, 14]]


def test_evaluate_image_scores_the_prediction_without_its_specks():
    gt = np.zeros((12, 12), bool)
    gt[1:4, 1:4] = True
    prob = np.where(_mask(), 0.9, 0.1)
    eps = 1e-4
    assert evaluate_image(prob, gt, 0.5)["iou"] == pytest.approx((9 + eps) / (12 + eps))
    row = evaluate_image(prob, gt, 0.5, min_size=3)
    assert row["iou"] == pytest.approx((9 + eps) / (9 + eps)) and row["fp"] == 0 and row["inst_fp"] == 0
    assert evaluate_image(prob, gt, 0.5, min_size=2)["fp"] == 2


def test_a_run_before_min_size_resumes_only_with_it_off():
    cfg = load_config(ROOT / "configs" / "real3.yaml")
    before = {k: v for k, v in cfg.flat().items() if k != "eval.min_size_fraction"}
    assert changed_keys(before, cfg.flat()) == ["eval.min_size_fraction"]
    assert changed_keys(before, load_config(ROOT / "configs" / "real3.yaml", ["eval.min_size_fraction=0"]).flat()) == []
    with pytest.raises(Exception, match="eval.min_size_fraction"):
        load_config(ROOT / "configs" / "real3.yaml", ["eval.min_size_fraction=1.5"])
