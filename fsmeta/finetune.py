"""K-shot fine-tuning (§4.5): weighted BCE, Adam, from a pre-trained checkpoint with affine BN.

Before fine-tuning, batch norm becomes affine with scale 1 and shift 0, so the
first step starts from exactly the pre-trained function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from fsmeta.augment import augmentation
from fsmeta.config import AugmentConfig, ComputeConfig, FinetuneConfig
from fsmeta.data.crops import CropIndex, gather
from fsmeta.data.sampling import batch_stream
from fsmeta.data.store import ImageSet, to_unit_float
from fsmeta.errors import FsmetaError
from fsmeta.losses import weighted_bce
from fsmeta.models import SegmentationModel, clone_state, make_bn_affine
from fsmeta.progress import Progress
from fsmeta.step import Forward, TrainingStep


def support_crops(images: ImageSet, index: CropIndex) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = gather(images, index)
    return torch.from_numpy(x), torch.from_numpy(y)


THRESHOLD_BINS = 100  # the held-out threshold is chosen on a grid of 1/100
THRESHOLD_RANGE = (0.05, 0.95)
CONTEXT_MARGIN = 32  # pixels of training region predicted beside a band (the network's context), never scored
# eval.pool_threshold: the pool is trusted only where the share it is predicted at the bands'
# threshold and the support's annotated share differ by at most this factor (docs/results.md)
POOL_AGREEMENT = 4.0


@dataclass
class HeldOut:
    """A band of each support image kept out of training, to choose the fine-tuning's stopping
    step and decision threshold from the support set alone (``finetune.holdout``).

    Each band is ``holdout`` of its image's height or width along one side (the side drawn by the
    seed among those whose band holds foreground and leaves the image a training crop); crops
    that touch a band are not trained on while the step is chosen. Every ``finetune.val_every``
    steps the bands are predicted (with ``CONTEXT_MARGIN`` pixels of the training region beside them
    as context, not scored) and their pixel-pooled IoU taken at the best threshold of a 1/100 grid
    in [0.05, 0.95]; the weights of the best validation are kept (early stopping, with
    ``finetune.patience``), or with ``finetune.refit`` the steps up to it are re-run on every crop.

    After :func:`finetune`, ``best_step``, ``threshold``, ``iou`` and ``curve`` hold the outcome.
    """

    train_rows: np.ndarray  # rows of the support's crop index that touch no band
    windows: list[np.ndarray]  # float32 [0, 1] image windows: a band and its context margin
    masks: list[np.ndarray]  # the band's mask (bool), the scored part of its window
    scored: list[tuple[slice, slice]]  # where the band lies in its window
    bands: list[tuple[str, str, int]]  # (image id, side, band thickness in pixels), for the record
    best_step: int = 0
    threshold: float = 0.5
    iou: float = float("nan")
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, IoU, threshold) of every validation
    raw_threshold: float | None = None  # the threshold of the best validation, when :meth:`calibrate` chose again
    calibration: np.ndarray | None = None  # :meth:`calibrate`'s pooled IoU of the bands at each bin of the grid
    pool: dict[str, float] | None = None  # :meth:`match_pool`'s record, when it ran

    def score(self, model: SegmentationModel, compute: ComputeConfig | None = None) -> tuple[float, float]:
        """(pooled IoU of the bands at the best threshold, that threshold) for ``model`` as it is;
        ties go to the threshold nearest 0.5. Leaves the model in training mode."""
        from fsmeta.compute import inference_model

        fg = np.zeros(THRESHOLD_BINS, np.int64)
        bg = np.zeros(THRESHOLD_BINS, np.int64)
        for bins, mask, (rows, cols) in zip(self._bins(model, inference_model(model, compute), compute), self.masks, self.scored):
            fg += np.bincount(bins[rows, cols][mask], minlength=THRESHOLD_BINS)
            bg += np.bincount(bins[rows, cols][~mask], minlength=THRESHOLD_BINS)
        return best_threshold(fg, bg)

    def calibrate(self, model: SegmentationModel, compute: ComputeConfig | None = None, min_size: int = 0,
                  tta: bool = False, transforms: tuple[tuple[int, bool], ...] | None = None) -> tuple[float, float]:
        """Choose the threshold again at the weights fine-tuning ended on, scoring the bands as the
        evaluation scores a test image: predicted components under ``min_size`` pixels dropped
        (labelled over each whole window, band and context, so an object the band's edge cuts
        keeps the part of it beside the band) and, with ``tta``, the mean over the 8 flips and
        turns (or over ``transforms``, :class:`fsmeta.models.DihedralTTA`'s). Sets and returns (pooled IoU, threshold); ties go to the threshold nearest the one
        :meth:`score` chose (so a band that scores 0 everywhere keeps it), and the step stays
        :meth:`score`'s. With neither, it returns :meth:`score`'s choice at these weights."""
        from fsmeta.compute import inference_model
        from fsmeta.metrics import drop_small
        from fsmeta.models import DihedralTTA
        from fsmeta.models.tta import DIHEDRAL

        scorer = inference_model(model, compute)
        windows = self._bins(model, DihedralTTA(scorer, transforms or DIHEDRAL) if tta else scorer, compute)
        iou = np.zeros(THRESHOLD_BINS)
        for k in threshold_grid(THRESHOLD_BINS):
            tp = fp = fn = 0
            for bins, mask, (rows, cols) in zip(windows, self.masks, self.scored):
                pred = drop_small(bins >= k, min_size)[rows, cols]
                tp += int(np.count_nonzero(pred & mask))
                fp += int(np.count_nonzero(pred & ~mask))
                fn += int(np.count_nonzero(mask & ~pred))
            iou[k] = tp / (tp + fp + fn) if tp + fp + fn else 0.0
        k = best_bin(iou, self.threshold, 0.5)
        self.calibration = iou
        self.raw_threshold, self.iou, self.threshold = self.threshold, float(iou[k]), k / THRESHOLD_BINS
        return self.iou, self.threshold

    def match_pool(self, support_share: float, pool_curve: np.ndarray) -> float:
        """Move the threshold halfway to the one at which unannotated images of the target get the
        support's foreground share (``eval.pool_threshold``), unless the two disagree.

        ``pool_curve[k]`` is the share of the pool images' pixels predicted at or above bin ``k``
        (:func:`pool_share_curve`) and ``support_share`` the foreground share of the support's
        annotation. The pool's threshold is the bin of the grid whose share is nearest
        ``support_share`` on a log scale (ties: the lower); the new threshold is the mean of it and
        the bands' (rounded down to the grid). When the pool's share at the bands' threshold and
        ``support_share`` differ by more than :data:`POOL_AGREEMENT` times (a support that is not
        typical of the target, e.g. one nearly empty tile), the bands' threshold stays. Sets and
        returns ``threshold``; ``pool`` records the bands' and the pool's thresholds, the ratio and
        whether the pool was used. Reads no mask but the support's."""
        if not 0.0 < support_share <= 1.0:
            raise FsmetaError(f"the support's foreground share must lie in (0, 1], got {support_share!r}")
        curve = np.asarray(pool_curve, dtype=float)
        if curve.shape != (THRESHOLD_BINS,):
            raise FsmetaError(f"the pool curve needs {THRESHOLD_BINS} bins, got shape {curve.shape}")
        grid = threshold_grid(THRESHOLD_BINS)
        bands = int(round(self.threshold * THRESHOLD_BINS))
        target = np.log(support_share)
        k_pool = min(grid, key=lambda k: (abs(np.log(max(curve[k], 1e-9)) - target), k))
        ratio = float(curve[bands]) / support_share
        used = 1.0 / POOL_AGREEMENT <= ratio <= POOL_AGREEMENT
        k = (bands + k_pool) // 2 if used else bands
        self.pool = {"pool_bands_threshold": bands / THRESHOLD_BINS, "pool_match_threshold": k_pool / THRESHOLD_BINS,
                     "pool_ratio": ratio, "pool_used": float(used)}
        self.threshold = k / THRESHOLD_BINS
        return self.threshold

    def _bins(self, model: SegmentationModel, scorer: torch.nn.Module, compute: ComputeConfig | None) -> list[np.ndarray]:
        """Each whole window's probabilities under ``scorer`` (``model``'s inference form), as bins
        of the 1/``THRESHOLD_BINS`` grid; leaves ``model`` in training mode."""
        from fsmeta.evaluate import predict_probability

        bins = [np.minimum((predict_probability(scorer, w, compute) * THRESHOLD_BINS).astype(np.int64), THRESHOLD_BINS - 1)
                for w in self.windows]
        model.train()
        return bins

    def summary(self) -> dict[str, float | int]:
        extra = {} if self.raw_threshold is None else {"holdout_raw_threshold": float(self.raw_threshold)}
        extra.update(self.pool or {})
        return {"holdout_step": int(self.best_step), "holdout_iou": float(self.iou), "holdout_threshold": float(self.threshold),
                "holdout_bands": len(self.bands), "holdout_train_crops": int(len(self.train_rows)), **extra}


def pool_share_curve(scorer: torch.nn.Module, images, compute: ComputeConfig | None = None, progress: bool = False) -> np.ndarray:
    """The share of the pixels of ``images`` (float [0, 1] arrays, unannotated) that ``scorer`` (a
    model's inference form, or its TTA mean) predicts at or above each bin of the threshold grid:
    entry ``k`` is the foreground share at threshold ``k / THRESHOLD_BINS``."""
    from fsmeta.evaluate import predict_probability

    images = list(images)
    bar = Progress(len(images), "predict the unannotated pool", enabled=progress)
    counts, total = np.zeros(THRESHOLD_BINS, np.int64), 0
    for image in images:
        prob = predict_probability(scorer, image, compute)
        bar.update()
        counts += np.bincount(np.minimum((prob * THRESHOLD_BINS).astype(np.int64), THRESHOLD_BINS - 1).ravel(),
                              minlength=THRESHOLD_BINS)
        total += prob.size
    if total == 0:
        raise FsmetaError("no unannotated pool image to read the foreground share from")
    return np.cumsum(counts[::-1])[::-1] / total


def best_threshold(fg: np.ndarray, bg: np.ndarray) -> tuple[float, float]:
    """(IoU, threshold) maximising the pooled IoU of pixels whose probabilities fall in the bins
    ``fg`` (foreground pixels) and ``bg`` (background): predicting foreground at bin ``k`` and above
    means the threshold ``k / len(fg)``. Thresholds in :data:`THRESHOLD_RANGE`; ties → nearest 0.5."""
    bins = len(fg)
    tp = np.cumsum(fg[::-1])[::-1]  # foreground pixels at bin k or above
    fp = np.cumsum(bg[::-1])[::-1]
    fn = int(fg.sum()) - tp
    denom = tp + fp + fn
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), 0.0)
    k = best_bin(iou, 0.5)
    return float(iou[k]), k / bins


def threshold_grid(bins: int) -> range:
    """The bins whose thresholds ``k / bins`` lie in :data:`THRESHOLD_RANGE`."""
    return range(int(round(THRESHOLD_RANGE[0] * bins)), int(round(THRESHOLD_RANGE[1] * bins)) + 1)


def best_bin(iou: np.ndarray, *prefer: float) -> int:
    """The bin of :func:`threshold_grid` with the highest ``iou``; ties go to the threshold nearest
    ``prefer[0]``, then ``prefer[1]``…"""
    bins = len(iou)
    return min(threshold_grid(bins), key=lambda k: (-iou[k], *(abs(k / bins - p) for p in prefer)))


def hold_out(images: ImageSet, index: CropIndex, fraction: float, seed: int) -> HeldOut | None:
    """The held-out bands of the images in ``index`` (see :class:`HeldOut`); None when no image
    can give one (every band would be empty of foreground or leave its image no training crop)."""
    size = index.size
    keep = np.ones(len(index), dtype=bool)
    windows, masks, scored, bands = [], [], [], []
    for i in np.unique(index.image):
        i = int(i)
        mask = np.asarray(images.masks[i]) > 0
        h, w = mask.shape
        rows = np.nonzero(index.image == i)[0]
        ys, xs = index.y[rows].astype(np.int64), index.x[rows].astype(np.int64)
        for side in np.random.default_rng([seed, 7919, i]).permutation(4):
            side = ("top", "bottom", "left", "right")[int(side)]
            extent = h if side in ("top", "bottom") else w
            band = max(8, int(round(fraction * extent)))
            if band >= extent:
                continue
            if side == "top":
                touches, region = ys < band, (slice(0, band), slice(None))
                window = (slice(0, min(h, band + CONTEXT_MARGIN)), slice(None))
            elif side == "bottom":
                touches, region = ys + size > h - band, (slice(h - band, h), slice(None))
                window = (slice(max(0, h - band - CONTEXT_MARGIN), h), slice(None))
            elif side == "left":
                touches, region = xs < band, (slice(None), slice(0, band))
                window = (slice(None), slice(0, min(w, band + CONTEXT_MARGIN)))
            else:
                touches, region = xs + size > w - band, (slice(None), slice(w - band, w))
                window = (slice(None), slice(max(0, w - band - CONTEXT_MARGIN), w))
            if touches.all() or not mask[region].any():
                continue
            keep[rows[touches]] = False
            offset = (region[0].start - (window[0].start or 0)) if side in ("top", "bottom") else (region[1].start - (window[1].start or 0))
            local = (slice(offset, offset + band), slice(None)) if side in ("top", "bottom") else (slice(None), slice(offset, offset + band))
            windows.append(images.image(i)[window])
            masks.append(mask[region])
            scored.append(local)
            bands.append((images.ids[i], side, band))
            break
    if not windows:
        return None
    return HeldOut(np.nonzero(keep)[0], windows, masks, scored, bands)


def hold_out_patches(images: ImageSet, patches: list[tuple[int, int, int, int, int]], fraction: float,
                     seed: int) -> HeldOut | None:
    """Held-out patches of a patch support (``select.unit=patch``), the counterpart of
    :func:`hold_out`'s bands: ``round(fraction × n)`` of the ``n`` annotated patches
    ``(image, y, x, height, width)`` — support row ``r`` is patch ``r``, as
    :func:`fsmeta.select.selection_crops` stacks them — are kept out of training to choose the
    step and the threshold. They are drawn by the seed among the patches whose annotation holds
    foreground (a band must hold foreground too); each is predicted with up to
    :data:`CONTEXT_MARGIN` pixels of its image around it as context (input only: the image's
    pixels, never a mask outside the patch) and scored on the patch. None when fewer than two
    patches are annotated, when ``fraction × n`` rounds to 0, or when no patch holds foreground;
    at least one patch always trains."""
    n = len(patches)
    count = min(int(round(fraction * n)), n - 1)
    if count < 1:
        return None
    annotated = [np.asarray(images.masks[i])[y: y + h, x: x + w] > 0 for i, y, x, h, w in patches]
    order = np.random.default_rng([seed, 7919, n]).permutation(n)
    chosen = [int(r) for r in order if annotated[r].any()][:count]
    if not chosen:
        return None
    windows, masks, scored, bands = [], [], [], []
    for r in sorted(chosen):
        i, y, x, h, w = (int(v) for v in patches[r])
        image = images.images[i]  # only the window is converted to float, not the whole image per patch
        y0, x0 = max(0, y - CONTEXT_MARGIN), max(0, x - CONTEXT_MARGIN)
        y1, x1 = min(image.shape[0], y + h + CONTEXT_MARGIN), min(image.shape[1], x + w + CONTEXT_MARGIN)
        windows.append(to_unit_float(np.asarray(image[y0:y1, x0:x1])))
        masks.append(annotated[r])
        scored.append((slice(y - y0, y - y0 + h), slice(x - x0, x - x0 + w)))
        bands.append((images.ids[i], f"patch y{y} x{x}", h))
    keep = np.setdiff1d(np.arange(n), chosen)
    return HeldOut(keep, windows, masks, scored, bands)


def finetune(
    model: SegmentationModel,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: FinetuneConfig,
    seed: int,
    where: str = "fine-tune",
    compute: ComputeConfig | None = None,
    progress: bool = False,
    augment: AugmentConfig | None = None,
    holdout: HeldOut | None = None,
    shots: int = 0,
) -> tuple[SegmentationModel, list[float]]:
    """Fine-tune ``model`` in place on support crops; returns it and the mean loss per epoch
    (with a step budget, ``cfg.budget(shots)``: per chunk of at most 50 steps).

    The model trains on the device it is on; ``compute`` (default:
    :class:`~fsmeta.config.ComputeConfig`'s, i.e. bf16 autocast and channels_last where
    the device has native bf16, fp32 elsewhere) says how. Losses are computed in fp32 and read back once per
    epoch, so a non-finite loss stops the run at the end of its epoch.

    Args:
        model: a pre-trained model; its batch norm is made affine (identity) here.
        x: support crops, (N, 1, S, S) in [-1, 1], on the host.
        y: their masks, (N, 1, S, S) in {0, 1}.
        seed: seeds the order of crops in every epoch.
        progress: print a progress line (steps, rate, ETA, last epoch's loss) every 5 s.
        augment: the augmentation settings; applied when ``augment.finetune`` is on, seeded by ``seed``.
        holdout: held-out bands of the support images (:func:`hold_out`): training runs on
            ``holdout.train_rows`` only, is validated every ``cfg.val_every`` steps and ends with the
            best validation's weights (``cfg.refit``: re-trained on every crop for that many steps);
            the outcome is written into ``holdout``.
        shots: the support images the crops come from; with ``cfg.steps`` > 0 the budget is
            ``cfg.budget(shots)`` steps (at least ``cfg.steps_per_shot`` per shot). 0: ``cfg.steps``.
    """
    if len(x) == 0:
        raise FsmetaError(f"{where}: the support set has no crops")
    make_bn_affine(model)
    model.train()
    if holdout is None:
        return model, _train(model, x, y, cfg, seed, where, compute, progress, augment, cfg.budget(shots))
    if len(holdout.train_rows) == 0:
        raise FsmetaError(f"{where}: every support crop touches a held-out band; lower finetune.holdout")
    initial = clone_state(model) if cfg.refit else None
    rows = torch.from_numpy(holdout.train_rows.astype(np.int64))
    budget = cfg.budget(shots) or cfg.epochs * -(-len(rows) // cfg.batch_size)
    best: dict[str, torch.Tensor] | None = None
    stale = 0

    def validate(step: int) -> bool:
        nonlocal best, stale
        iou, threshold = holdout.score(model, compute)
        holdout.curve.append((step, iou, threshold))
        if best is None or iou > holdout.iou:
            holdout.best_step, holdout.iou, holdout.threshold = step, iou, threshold
            best, stale = ({} if cfg.refit else clone_state(model)), 0  # a refit needs the step only
        else:
            stale += 1
        return bool(cfg.patience) and stale >= cfg.patience

    history = _train(model, x[rows], y[rows], cfg, seed, where, compute, progress, augment, budget, validate)
    if not cfg.refit:
        model.load_state_dict(best)
        return model, history
    model.load_state_dict(initial)
    # the refit retraces the first best_step steps of the budget's schedule (the rates the chosen weights had)
    return model, _train(model, x, y, cfg, seed, f"{where} (refit)", compute, progress, augment, holdout.best_step,
                         schedule_steps=budget)


def lr_factor(schedule: str, steps: int) -> Callable[[int], float] | None:
    """The learning-rate factor of step t (from 0) under ``finetune.lr_schedule`` over ``steps``
    steps: None for ``constant``; ``cosine`` is ½(1 + cos(π t / steps)), 1 at the first step
    and falling towards 0 at the last (SGDR without restarts, Loshchilov & Hutter 2017)."""
    if schedule == "constant":
        return None
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def _train(model: SegmentationModel, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, seed: int, where: str,
           compute: ComputeConfig | None, progress: bool, augment: AugmentConfig | None, steps: int,
           validate: Callable[[int], bool] | None = None, schedule_steps: int = 0) -> list[float]:
    """The fine-tuning loop: ``steps`` > 0 full batches drawn across seeded epochs (the loss read
    every chunk of at most 50 steps), else ``cfg.epochs`` seeded epochs (the loss read per epoch).
    ``validate(step)`` (step budgets only) runs after every ``cfg.val_every`` steps and the last;
    True stops the loop. ``cfg.lr_schedule`` spans ``schedule_steps`` (0: the loop's own steps)."""
    # Crops stay in host memory; each batch follows the model to its device.
    transform = augmentation(augment, (seed, 31337)) if augment is not None and augment.finetune else None
    per_epoch = -(-len(x) // cfg.batch_size)
    factor = lr_factor(cfg.lr_schedule, schedule_steps or steps or cfg.epochs * per_epoch)
    step = TrainingStep(model, lr=cfg.lr, weight_decay=cfg.weight_decay, compute=compute, transform=transform,
                        lr_factor=factor)
    history: list[float] = []
    bar = Progress(steps or cfg.epochs * per_epoch, where, enabled=progress)

    def checkpoint(done: int, last: bool) -> bool:
        return validate is not None and (done % cfg.val_every == 0 or last) and validate(done)

    if steps > 0:
        # A step budget: full batches across seeded epochs; the loss is read every chunk of steps.
        chunk = min(per_epoch, 50)
        batches = batch_stream(len(x), min(cfg.batch_size, len(x)), (seed, 31337))
        for i in range(steps):
            rows = torch.from_numpy(next(batches))
            step(supervised_loss, x[rows], y[rows])
            bar.update(detail=f"step {i + 1}/{steps}" + (f", loss {history[-1]:.4f}" if history else ""))
            last = i + 1 == steps
            stop = checkpoint(i + 1, last)
            if (i + 1) % chunk == 0 or last or stop:
                losses = step.read_losses(lambda k, terms: f"{where}: loss is {terms[0]} at step {k}; lower finetune.lr")
                history.append(sum(t[0] for t in losses) / len(losses))
            if stop:
                break
        return history
    # Epochs: only without held-out bands (finetune() turns an epoch budget into steps for them).
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(np.random.default_rng([seed, 31337, epoch]).permutation(len(x)))
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            step(supervised_loss, x[rows], y[rows])
            bar.update(detail=f"epoch {epoch + 1}/{cfg.epochs}" + (f", loss {history[-1]:.4f}" if history else ""))
        losses = step.read_losses(lambda _, terms: f"{where}: loss is {terms[0]} in epoch {epoch}; lower finetune.lr")
        history.append(sum(t[0] for t in losses) / len(losses))
    return history


def supervised_loss(forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of fine-tuning, transfer training and the pretext task: weighted BCE of the
    logits of ``x`` against the masks ``y`` (a :class:`~fsmeta.step.TrainingStep` loss)."""
    return weighted_bce(forward(x)[0], y)
