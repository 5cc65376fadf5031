"""K-shot fine-tuning (§4.5): weighted BCE, Adam, from a pre-trained checkpoint with affine BN.

Before fine-tuning, batch norm becomes affine with scale 1 and shift 0, so the
first step starts from exactly the pre-trained function.
"""

from __future__ import annotations

import numpy as np
import torch

from fsmeta.augment import augmentation
from fsmeta.config import AugmentConfig, ComputeConfig, FinetuneConfig
from fsmeta.data.crops import CropIndex, gather
from fsmeta.data.sampling import batch_stream
from fsmeta.data.store import ImageSet
from fsmeta.errors import FsmetaError
from fsmeta.losses import weighted_bce
from fsmeta.models import SegmentationModel, make_bn_affine
from fsmeta.progress import Progress
from fsmeta.step import Forward, TrainingStep


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
    progress: bool = False,
    augment: AugmentConfig | None = None,
) -> tuple[SegmentationModel, list[float]]:
    """Fine-tune ``model`` in place on support crops; returns it and the mean loss per epoch
    (with a ``cfg.steps`` budget: per chunk of at most 50 steps).

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
    """
    if len(x) == 0:
        raise FsmetaError(f"{where}: the support set has no crops")
    make_bn_affine(model)
    model.train()
    # Crops stay in host memory; each batch follows the model to its device.
    transform = augmentation(augment, (seed, 31337)) if augment is not None and augment.finetune else None
    step = TrainingStep(model, lr=cfg.lr, weight_decay=cfg.weight_decay, compute=compute, transform=transform)
    history: list[float] = []
    per_epoch = -(-len(x) // cfg.batch_size)
    bar = Progress(cfg.steps or cfg.epochs * per_epoch, where, enabled=progress)
    if cfg.steps > 0:
        # A step budget: full batches across seeded epochs; the loss is read every chunk of steps.
        chunk = min(per_epoch, 50)
        batches = batch_stream(len(x), min(cfg.batch_size, len(x)), (seed, 31337))
        for i in range(cfg.steps):
            rows = torch.from_numpy(next(batches))
            step(supervised_loss, x[rows], y[rows])
            bar.update(detail=f"step {i + 1}/{cfg.steps}" + (f", loss {history[-1]:.4f}" if history else ""))
            if (i + 1) % chunk == 0 or i + 1 == cfg.steps:
                losses = step.read_losses(lambda k, terms: f"{where}: loss is {terms[0]} at step {k}; lower finetune.lr")
                history.append(sum(t[0] for t in losses) / len(losses))
        return model, history
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(np.random.default_rng([seed, 31337, epoch]).permutation(len(x)))
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            step(supervised_loss, x[rows], y[rows])
            bar.update(detail=f"epoch {epoch + 1}/{cfg.epochs}" + (f", loss {history[-1]:.4f}" if history else ""))
        losses = step.read_losses(lambda _, terms: f"{where}: loss is {terms[0]} in epoch {epoch}; lower finetune.lr")
        history.append(sum(t[0] for t in losses) / len(losses))
    return model, history


def supervised_loss(forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of fine-tuning, transfer training and the pretext task: weighted BCE of the
    logits of ``x`` against the masks ``y`` (a :class:`~fsmeta.step.TrainingStep` loss)."""
    return weighted_bce(forward(x)[0], y)
