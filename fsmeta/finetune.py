"""K-shot fine-tuning (§4.5): weighted BCE, Adam, from a pre-trained checkpoint with affine BN.

Before fine-tuning, batch norm becomes affine with scale 1 and shift 0, so the
first step starts from exactly the pre-trained function.
"""

from __future__ import annotations

import numpy as np
import torch

from fsmeta.config import FinetuneConfig
from fsmeta.data.crops import CropIndex, gather
from fsmeta.data.store import ImageSet
from fsmeta.errors import FsmetaError, NonFiniteLossError
from fsmeta.losses import weighted_bce
from fsmeta.models import SegmentationModel, make_bn_affine


def support_crops(images: ImageSet, index: CropIndex) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = gather(images, index)
    return torch.from_numpy(x), torch.from_numpy(y)


def finetune(
    model: SegmentationModel,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: FinetuneConfig,
    seed: int,
    where: str = "fine-tune",
) -> tuple[SegmentationModel, list[float]]:
    """Fine-tune ``model`` in place on support crops; returns it and the mean loss per epoch.

    Args:
        model: a pre-trained model; its batch norm is made affine (identity) here.
        x: support crops, (N, 1, S, S) in [-1, 1].
        y: their masks, (N, 1, S, S) in {0, 1}.
        seed: seeds the order of crops in every epoch.
    """
    if len(x) == 0:
        raise FsmetaError(f"{where}: the support set has no crops")
    make_bn_affine(model)
    model.train()
    # Crops stay in host memory; each batch follows the model to its device.
    device = next(model.parameters()).device
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(np.random.default_rng([seed, 31337, epoch]).permutation(len(x)))
        total, batches = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            optimiser.zero_grad(set_to_none=True)
            xb, yb = x[rows].to(device, non_blocking=True), y[rows].to(device, non_blocking=True)
            loss = weighted_bce(model(xb), yb)
            value = float(loss.detach())
            if not np.isfinite(value):
                raise NonFiniteLossError(f"{where}: loss is {value} in epoch {epoch}; lower finetune.lr")
            loss.backward()
            optimiser.step()
            total += value
            batches += 1
        history.append(total / batches)
    return model, history
