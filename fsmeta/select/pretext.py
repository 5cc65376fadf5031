"""The pretext task (Dawoud et al. 2023, §3.2, Eq. 3): fine-tune the pre-trained
model on target crops labelled by :mod:`fsmeta.select.pseudo`, so that it scores
target patches from a representation adapted to the target.

Defaults are the paper's: every target image (``select.pretext_images = all``;
only pixels, never a mask, so test images may take part, as in the paper — set
``pool`` to keep them out), 256×256 crops at the data set's fine-tune stride,
100 epochs (``select.pretext_max_steps`` caps the steps of a large target), Adam lr 1e-4,
weight decay 5e-4, batch 64, weighted BCE. Crops are
gathered batch by batch, so thousands of crops never sit in memory at once.
Batch norm becomes affine (identity) first, exactly as in fine-tuning.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from fsmeta.compute import host_buffer
from fsmeta.config import Config, SelectConfig
from fsmeta.data.colour import sample_positions
from fsmeta.data.crops import build_crop_index, fitted_crop, gather
from fsmeta.data.store import ImageSet
from fsmeta.finetune import supervised_loss
from fsmeta.models import SegmentationModel, make_bn_affine
from fsmeta.progress import Progress
from fsmeta.select.pseudo import choose_polarity, pseudo_label
from fsmeta.step import TrainingStep

log = logging.getLogger(__name__)


def resolve_gamma(cfg: Config, name: str, gamma: float | str | None = None) -> float | str:
    """The γ pseudo-labels of data set ``name`` use: ``gamma`` if given (a number or ``"auto"``),
    else ``"auto"`` with ``select.auto_gamma``, else ``select.gamma[name]``."""
    if gamma is not None:
        return gamma
    return "auto" if cfg.select.auto_gamma else float(cfg.select.lookup("gamma", name))


# Data sets whose images are a lab's own: without a polarity entry of their own, it is read off the images.
LAB_KINDS = ("folder", "imported")


def resolve_polarity(cfg: Config, images: ImageSet, indices: Iterable[int] | None = None) -> tuple[str, str]:
    """The polarity of ``images``' pseudo-labels and why: an entry for the data set's name in
    ``select.polarity`` (configured or built in: b5, b39, the fluorescent synthetic domains) wins;
    a lab's images (a folder, an imported data set) without one are read (:func:`choose_polarity`
    on up to 16 evenly spaced images of ``indices``); any other data set takes the table's ``default``
    (dark, the papers' convention for TNBC, EM and ssTEM)."""
    name = images.name
    if name in cfg.select.polarity or name in SelectConfig().polarity:
        return str(cfg.select.lookup("polarity", name)), f"select.polarity entry for {name}"
    if images.meta.get("kind") in LAB_KINDS:
        rows = list(range(len(images))) if indices is None else [int(i) for i in indices]
        return choose_polarity([images.image(rows[k]) for k in sample_positions(len(rows))], name)
    return str(cfg.select.lookup("polarity", name)), "select.polarity default"


def pseudo_labelled(images: ImageSet, cfg: Config, indices: Iterable[int] | None = None, gamma: float | str | None = None) -> ImageSet:
    """A copy of ``images`` whose masks are pseudo-labels (the true masks are not read); its ``meta``
    records the polarity used and why (``polarity``, ``polarity_reason``: :func:`resolve_polarity`).

    ``gamma`` overrides the configuration: a number, or ``"auto"``; None takes
    ``select.auto_gamma`` / ``select.gamma[data set]``.
    """
    sel = cfg.select
    name = images.name  # the per-data-set tables (γ, polarity) are looked up by it
    gamma = resolve_gamma(cfg, name, gamma)
    rows = list(range(len(images))) if indices is None else [int(i) for i in indices]
    polarity, reason = resolve_polarity(cfg, images, rows)
    log.info("pseudo-labels of %s: polarity %s (%s)", name, polarity, reason)
    masks = [pseudo_label(images.image(i), gamma, polarity=polarity, method=sel.pseudo) for i in rows]
    sub = images.subset(rows)
    return ImageSet(sub.name, sub.ids, sub.images, masks, sub.splits, sub.sources,
                    {**sub.meta, "pseudo_labels": True, "polarity": polarity, "polarity_reason": reason})


def pretext_finetune(
    model: SegmentationModel,
    images: ImageSet,
    cfg: Config,
    seed: int = 0,
    *,
    indices: Iterable[int] | None = None,
    gamma: float | str | None = None,
    progress: bool = False,
) -> SegmentationModel:
    """Fine-tune ``model`` in place on pseudo-labelled crops of ``images``; returns it.

    Args:
        model: pre-trained (non-affine BN) or already affine; BN is made affine here.
        images: the target data set; only its pixels are used.
        cfg: ``select.pretext_*``, ``data.crop_size``, the fine-tune stride of the data set.
        seed: the crop order of every epoch.
        indices: images to use; None: every image (``pretext_images=all``).
        gamma: see :func:`pseudo_labelled`.
        progress: a progress line every few seconds, per epoch (off in studies).
    """
    sel = cfg.select
    make_bn_affine(model)
    if sel.pretext_epochs == 0:
        return model
    labelled = pseudo_labelled(images, cfg, indices, gamma)
    stride = sel.pretext_stride or cfg.data.stride(images.name, "finetune")
    # Every window counts: a window with no pseudo-foreground is still target texture to adapt to.
    # images smaller than data.crop_size shrink the crop (fitted_crop), as fine-tuning's do
    size, _, note = fitted_crop(labelled, cfg.data.crop_size, 0)
    if note:
        log.info("pretext on %s: %s", images.name, note)
    # finetune.cover_edges: the windows flush with the far edges too, so no strip of the target is left out
    index = build_crop_index(labelled, size, stride, min_foreground=0, cover=cfg.finetune.cover_edges)
    log.info("pretext: %d pseudo-labelled crops of %s, %d epochs", len(index), images.name, sel.pretext_epochs)
    model.train()
    step = TrainingStep(model, lr=sel.pretext_lr, weight_decay=sel.pretext_weight_decay, compute=cfg.compute)
    per_epoch = -(-len(index) // sel.pretext_batch_size)
    total = sel.pretext_epochs * per_epoch
    if sel.pretext_max_steps and total > sel.pretext_max_steps:
        # A large target (many or big images) would otherwise cost epochs × its crops: the cap
        # bounds it, the crop order is the same as without it up to the last step.
        log.info("pretext: %d epochs of %d steps capped at select.pretext_max_steps=%d", sel.pretext_epochs, per_epoch,
                 sel.pretext_max_steps)
        total = sel.pretext_max_steps
    bar = Progress(-(-total // per_epoch), "select: pretext fine-tuning", enabled=progress)
    done = 0
    for epoch in range(sel.pretext_epochs):
        order = np.random.default_rng([seed, 4242, epoch]).permutation(len(index))
        for start in range(0, len(order), sel.pretext_batch_size):
            if done == total:
                break
            rows = order[start : start + sel.pretext_batch_size]
            # Crops go straight from the memory-mapped store into (pinned, on CUDA) batch memory.
            xb, yb = host_buffer((len(rows), 1, size, size), step.device), host_buffer((len(rows), 1, size, size), step.device)
            gather(labelled, index, rows, out=(xb.numpy(), yb.numpy()))
            step(supervised_loss, xb, yb)
            done += 1
        losses = step.read_losses(lambda _, terms: f"pretext on {images.name}: loss is {terms[0]} in epoch {epoch}; lower select.pretext_lr")
        bar.update(detail=f"loss {sum(t[0] for t in losses) / max(len(losses), 1):.4f}")
        if done == total:
            break
    model.eval()
    return model
