"""Segmentation metrics on numpy arrays: per-image statistics first, then explicit aggregation.

Aggregations used here:
    - ``mean_iou`` ("imagewise", the paper's mIoU): IoU of each image, then the mean.
    - ``pooled_iou`` ("micro"): TP/FP/FN summed over all images, then one IoU.
    - instance precision / recall / F1: matched-object counts summed over images, then P/R/F1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "Confusion", "InstanceStats", "binarize", "drop_small", "median_object_area", "confusion", "iou", "mean_iou", "pooled_iou",
    "instance_matching", "instance_stats_total", "evaluate_image", "summarize",
]


@dataclass(frozen=True)
class Confusion:
    """Pixel counts of one image (or a sum over images)."""

    tp: int
    fp: int
    fn: int
    tn: int


@dataclass(frozen=True)
class InstanceStats:
    """Object-level counts and the scores derived from them.

    ``precision = tp/(tp+fp)``, ``recall = tp/(tp+fn)``, ``f1 = 2tp/(2tp+fp+fn)``; each is 1.0
    when its denominator is 0 (no objects on the side(s) it looks at, so nothing went wrong).
    """

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int) -> InstanceStats:
        return cls(int(tp), int(fp), int(fn), _ratio(tp, tp + fp), _ratio(tp, tp + fn),
                   _ratio(2 * tp, 2 * tp + fp + fn))


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else float(num) / float(den)


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as bool (nonzero = foreground), after checking that their shapes agree."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match ground truth shape {gt.shape}"
        )
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def _check_lists(preds: Sequence, gts: Sequence) -> None:
    if len(preds) != len(gts) or not preds:
        raise ValueError(
            f"need equally many (>0) predictions and ground truths, got {len(preds)} and {len(gts)}"
        )


def binarize(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Foreground where ``prob >= threshold``; returns a bool array of the same shape."""
    return np.asarray(prob) >= threshold


def drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` (bool) without its 8-connected components of fewer than ``min_size`` pixels
    (``min_size`` ≤ 1 keeps every one)."""
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    small = np.bincount(labels.ravel(), minlength=n + 1) < min_size
    small[0] = False
    return mask & ~small[labels]


def median_object_area(masks: Iterable[np.ndarray]) -> float:
    """The median area (pixels) of the 8-connected components of annotated masks; 0 when none."""
    areas = []
    for m in masks:
        labels, n = ndimage.label(np.asarray(m) > 0, structure=np.ones((3, 3), bool))
        if n:
            areas.append(np.bincount(labels.ravel())[1:])
    return float(np.median(np.concatenate(areas))) if areas else 0.0


def confusion(pred: np.ndarray, gt: np.ndarray) -> Confusion:
    """Pixel TP/FP/FN/TN of a binary prediction against a binary ground truth (same shape)."""
    p, g = _pair(pred, gt)
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    return Confusion(tp, fp, fn, p.size - tp - fp - fn)


def iou(pred: np.ndarray, gt: np.ndarray, eps: float = 1e-4) -> float:
    """Per-image IoU ``(|P∩G| + eps) / (|P∪G| + eps)``; empty vs empty gives 1.0."""
    c = confusion(pred, gt)
    return (c.tp + eps) / (c.tp + c.fp + c.fn + eps)


def mean_iou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], eps: float = 1e-4) -> float:
    """Imagewise mIoU: the mean over images of the per-image :func:`iou`."""
    _check_lists(preds, gts)
    return float(np.mean([iou(p, g, eps) for p, g in zip(preds, gts)]))


def pooled_iou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """Micro IoU: TP/FP/FN summed over all images, then ``tp/(tp+fp+fn)`` (1.0 if that is 0/0)."""
    _check_lists(preds, gts)
    cs = [confusion(p, g) for p, g in zip(preds, gts)]
    tp, fp, fn = (sum(getattr(c, k) for c in cs) for k in ("tp", "fp", "fn"))
    return _ratio(tp, tp + fp + fn)


def instance_matching(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5,
                      connectivity: int | None = None) -> InstanceStats:
    """Match connected components of prediction and ground truth one-to-one by IoU.

    Objects are connected components found by ``scipy.ndimage.label``. ``connectivity`` is
    that of ``ndimage.generate_binary_structure``; the default (``None`` = ``pred.ndim``) is
    the full 3×3 structure, i.e. 8-connectivity in 2-D, so diagonally touching pixels form
    one object. The overlap of every intersecting (pred, gt) pair is counted in one pass with
    ``np.unique`` over combined labels of the overlapping pixels, the object areas with
    ``np.bincount``. Pairs with IoU strictly above ``iou_threshold`` are matched greedily by
    decreasing IoU. For ``iou_threshold >= 0.5`` this is exact: an object can have IoU > 0.5
    with at most one disjoint object on the other side, so the candidate pairs are already
    one-to-one. ``tp`` = matches, ``fp`` = unmatched predictions, ``fn`` = unmatched ground
    truths; scores as in :class:`InstanceStats`.
    """
    p, g = _pair(pred, gt)
    rank = p.ndim if connectivity is None else connectivity
    structure = ndimage.generate_binary_structure(p.ndim, rank)
    lp, n_p = ndimage.label(p, structure=structure)
    lg, n_g = ndimage.label(g, structure=structure)
    both = (lp > 0) & (lg > 0)
    codes, inter = np.unique(lp[both].astype(np.int64) * (n_g + 1) + lg[both], return_counts=True)
    ip, ig = np.divmod(codes, n_g + 1)
    area_p = np.bincount(lp.ravel(), minlength=n_p + 1)
    area_g = np.bincount(lg.ravel(), minlength=n_g + 1)
    pair_iou = inter / (area_p[ip] + area_g[ig] - inter)
    used_p, used_g, tp = set(), set(), 0
    for k in np.argsort(-pair_iou, kind="stable"):
        if pair_iou[k] <= iou_threshold:
            break
        if ip[k] not in used_p and ig[k] not in used_g:
            used_p.add(ip[k])
            used_g.add(ig[k])
            tp += 1
    return InstanceStats.from_counts(tp, n_p - tp, n_g - tp)


def instance_stats_total(stats: Iterable[InstanceStats]) -> InstanceStats:
    """Pool object counts over images (sum tp/fp/fn), then compute P/R/F1 once."""
    tp = fp = fn = 0
    for s in stats:
        tp, fp, fn = tp + s.tp, fp + s.fp, fn + s.fn
    return InstanceStats.from_counts(tp, fp, fn)


def evaluate_image(
    prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5, min_size: int = 0
) -> dict[str, float | int]:
    """All per-image statistics of one probability map (or binary prediction) against its mask.

    The prediction is ``prob >= threshold`` without its components under ``min_size`` pixels
    (:func:`drop_small`). Returns ``{'iou', 'tp', 'fp', 'fn', 'tn', 'inst_tp', 'inst_fp', 'inst_fn'}``:
    the pixel IoU (:func:`iou`), pixel counts, and object counts of :func:`instance_matching` (defaults).
    """
    pred = drop_small(binarize(prob, threshold), min_size)
    c = confusion(pred, gt)
    inst = instance_matching(pred, gt)
    return {"iou": iou(pred, gt), "tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn,
            "inst_tp": inst.tp, "inst_fp": inst.fp, "inst_fn": inst.fn}


def summarize(per_image: Sequence[dict]) -> dict[str, float | int]:
    """Aggregate :func:`evaluate_image` results over images.

    Returns ``miou`` (mean of per-image IoU), ``pooled_iou`` (pixel counts summed, then IoU),
    ``precision`` / ``recall`` / ``f1`` (object counts summed over images, then the scores) and
    ``n_images``.
    """
    if not per_image:
        raise ValueError("summarize needs at least one per-image result")
    keys = ("tp", "fp", "fn", "inst_tp", "inst_fp", "inst_fn")
    tot = {k: sum(int(d[k]) for d in per_image) for k in keys}
    inst = InstanceStats.from_counts(tot["inst_tp"], tot["inst_fp"], tot["inst_fn"])
    return {"miou": float(np.mean([d["iou"] for d in per_image])),
            "pooled_iou": _ratio(tot["tp"], tot["tp"] + tot["fp"] + tot["fn"]),
            "precision": inst.precision, "recall": inst.recall, "f1": inst.f1,
            "n_images": len(per_image)}
