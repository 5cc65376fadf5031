"""K-shot fine-tuning (§4.5): weighted BCE, Adam, from a pre-trained checkpoint with affine BN.

Before fine-tuning, batch norm becomes affine with scale 1 and shift 0, so the
first step starts from exactly the pre-trained function.
"""

from __future__ import annotations

import numpy as np
import torch

from fsmeta.compute import autocast, channels_last, forward_fn, host_values, prepare_model, to_device
from fsmeta.config import ComputeConfig, FinetuneConfig
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
    compute: ComputeConfig | None = None,
) -> tuple[SegmentationModel, list[float]]:
    """Fine-tune ``model`` in place on support crops; returns it and the mean loss per epoch.

    The model trains on the device it is on; ``compute`` (default:
    :class:`~fsmeta.config.ComputeConfig`'s, i.e. bf16 autocast and channels_last on
    CUDA, fp32 on a CPU) says how. Losses are computed in fp32 and read back once per
    epoch, so a non-finite loss stops the run at the end of its epoch.

    Args:
        model: a pre-trained model; its batch norm is made affine (identity) here.
        x: support crops, (N, 1, S, S) in [-1, 1], on the host.
        y: their masks, (N, 1, S, S) in {0, 1}.
        seed: seeds the order of crops in every epoch.
    """
    if len(x) == 0:
        raise FsmetaError(f"{where}: the support set has no crops")
    make_bn_affine(model)
    model.train()
    # Crops stay in host memory; each batch follows the model to its device.
    device = next(model.parameters()).device
    prepare_model(model, device, compute)
    cl = channels_last(device, compute)
    forward = forward_fn(model, compute)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(np.random.default_rng([seed, 31337, epoch]).permutation(len(x)))
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            optimiser.zero_grad(set_to_none=True)
            xb, yb = to_device(x[rows], device, cl), to_device(y[rows], device, cl)
            with autocast(device, compute):
                logits, _ = forward(xb)
            loss = weighted_bce(logits.float(), yb)
            loss.backward()
            optimiser.step()
            losses.append(loss.detach())
        values = host_values(losses)
        total = 0.0
        for value in values:
            if not np.isfinite(value):
                raise NonFiniteLossError(f"{where}: loss is {value} in epoch {epoch}; lower finetune.lr")
            total += value
        history.append(total / len(values))
    return model, history
