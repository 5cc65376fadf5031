"""Full-resolution evaluation (§4.5): per-image IoU, its mean (mIoU), pixel-pooled IoU,
and instance precision/recall/F1 from connected components."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from fsmeta.compute import autocast, channels_last, default_device, inference_model, to_device
from fsmeta.config import ComputeConfig
from fsmeta.data.crops import normalise
from fsmeta.data.store import ImageSet
from fsmeta.metrics import evaluate_image, summarize
from fsmeta.models import DihedralTTA, SegmentationModel
from fsmeta.progress import Progress

__all__ = ["default_device", "evaluate", "predict_probability"]


@torch.no_grad()
def predict_probability(model: SegmentationModel, image: np.ndarray, compute: ComputeConfig | None = None) -> np.ndarray:
    """Foreground probability (H, W) float32 of one [0, 1] image at full resolution.

    Runs on the model's device; with ``compute``'s defaults under bf16 autocast where
    the device has native bf16 (CUDA, AVX-512 BF16/AMX CPUs), else fp32; the sigmoid and
    the result are fp32.
    """
    model.eval()
    device = next(model.parameters()).device
    x = torch.from_numpy(normalise(np.ascontiguousarray(image, dtype=np.float32)))[None, None]
    with autocast(device, compute):
        logits = model(to_device(x, device, channels_last(device, compute)))
    return torch.sigmoid(logits.float())[0, 0].cpu().numpy()


def evaluate(model: SegmentationModel, images: ImageSet, indices: Iterable[int], threshold: float = 0.5,
             compute: ComputeConfig | None = None, progress: bool = False,
             min_size: int = 0, tta: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``model`` on the listed images (on its device, see :func:`predict_probability`);
    returns (summary, per-image rows). Foreground is ``p ≥ threshold`` less its components
    under ``min_size`` pixels; with ``tta``, p is the mean over the 8 flips and turns
    (:class:`fsmeta.models.DihedralTTA`).

    The summary holds ``miou`` (mean of per-image IoU), ``pooled_iou`` (TP, FP, FN
    summed over images first), instance ``precision``, ``recall``, ``f1`` and ``n_images``.
    ``progress`` prints a line every few seconds (off inside the benchmark's cells).
    """
    indices = list(indices)
    bar = Progress(len(indices), f"evaluate {images.name}", enabled=progress)
    rows = []
    scorer = inference_model(model, compute)  # bf16: batch norm folded (a copy); fp32: the model itself
    if tta:
        scorer = DihedralTTA(scorer)
    for i in indices:
        prob = predict_probability(scorer, images.image(int(i)), compute)
        row = evaluate_image(prob, images.masks[int(i)], threshold, min_size)
        rows.append({"image": images.ids[int(i)], **row})
        bar.update()
    return summarize(rows), rows
