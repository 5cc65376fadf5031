"""Full-resolution evaluation (§4.5): per-image IoU, its mean (mIoU), pixel-pooled IoU,
and instance precision/recall/F1 from connected components."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from fsmeta.data.crops import normalise
from fsmeta.data.store import ImageSet
from fsmeta.metrics import evaluate_image, summarize
from fsmeta.models import SegmentationModel


def default_device() -> torch.device:
    """CUDA when this process can see a GPU (in a Ray task: the one Ray assigned), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict_probability(model: SegmentationModel, image: np.ndarray) -> np.ndarray:
    """Foreground probability (H, W) float32 of one [0, 1] image at full resolution."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.from_numpy(normalise(np.ascontiguousarray(image, dtype=np.float32)))[None, None].to(device)
    return torch.sigmoid(model(x))[0, 0].float().cpu().numpy()


def evaluate(model: SegmentationModel, images: ImageSet, indices: Iterable[int], threshold: float = 0.5) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``model`` on the listed images; returns (summary, per-image rows).

    The summary holds ``miou`` (mean of per-image IoU), ``pooled_iou`` (TP, FP, FN
    summed over images first), instance ``precision``, ``recall``, ``f1`` and ``n_images``.
    """
    rows = []
    for i in indices:
        prob = predict_probability(model, images.image(int(i)))
        row = evaluate_image(prob, images.masks[int(i)], threshold)
        rows.append({"image": images.ids[int(i)], **row})
    return summarize(rows), rows
