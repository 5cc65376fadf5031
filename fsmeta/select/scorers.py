"""Four scores of how much a patch is worth annotating, behind one interface.

Every scorer maps a stack of [0, 1] patches to one number per patch; a higher
number means "annotate this first" (the selection takes the top |B|):

``random``       a seeded uniform draw (the baseline).
``entropy``      one forward pass; mean over pixels of the binary entropy
                 ``-p log p - (1-p) log(1-p)`` of ``p = σ(logit)``.
``mc-dropout``   Dropout2d (p = ``dropout``, 0.5) before the last conv switched on,
                 ``passes`` (10) stochastic forward passes; the binary entropy of
                 the mean probability, averaged over pixels. Seeded: the same
                 seed gives the same masks, different passes differ.
``typiclust``,    not scores: set-level choices from θ′'s features
``coverage``     (:mod:`fsmeta.select.diversity`, :func:`embed_patches`).
``consistency``  Dawoud et al. 2023, Eq. 4: the sum over the augmentations
                 {auto-contrast, brightness ψ, sharpness ψ} (PIL ``ImageOps`` /
                 ``ImageEnhance``) of the weighted BCE (SPEC §4.2: per patch,
                 w = #background / #foreground of the target, 1 without
                 foreground) between the logits on the augmented patch and the
                 prediction on the original, binarised at 0.5 as in the
                 authors' code (an all-foreground target gets w = 1, not §4.2's 0). Eq. 4 writes the soft prediction; with soft
                 targets a per-patch w explodes on patches the model is sure are
                 empty (w·p ≈ 1 on every pixel), and those rank first — measured
                 on synth-he, they were all empty patches. ``hard_target=False``
                 and ``weighted=False`` give the other variants (the authors'
                 code: hard target, no weight).

Augmentations work on 8-bit patches, as PIL does: a patch is rounded to uint8
once and *both* the original and the augmented predictions are made from that
rounded patch, so rounding itself never counts as inconsistency.

The model runs in eval mode (batch norm on running statistics) under no_grad;
MC-dropout switches on only its dropout module and restores it afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from fsmeta.compute import autocast, channels_last, to_device
from fsmeta.config import ComputeConfig
from fsmeta.data.crops import normalise
from fsmeta.errors import FsmetaError
from fsmeta.models import SegmentationModel

AUGMENTATIONS = ("autocontrast", "brightness", "sharpness")


@dataclass(frozen=True)
class ScoreContext:
    """What a scorer needs besides the model and the patches.

    ``key`` identifies the batch (e.g. the image index) so that seeded scorers
    give each image its own reproducible stream, whatever else is in the pool.
    """

    seed: int = 0
    key: int = 0
    psi: float = 1.3
    passes: int = 10
    dropout: float = 0.5
    batch_size: int = 32
    hard_target: bool = True  # consistency: binarise the prediction on the original at 0.5
    weighted: bool = True  # consistency: the §4.2 per-patch foreground weight
    compute: ComputeConfig | None = None  # precision of the forward passes (fsmeta.compute; logits come back fp32)


def to_uint8(patch: np.ndarray) -> np.ndarray:
    """[0, 1] float → uint8 by rounding (lossless for images stored as 8-bit)."""
    return np.clip(np.rint(np.asarray(patch, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def augment(patch_u8: np.ndarray, name: str, psi: float) -> np.ndarray:
    """One augmentation of an 8-bit (H, W) patch with PIL, returned as uint8 (H, W).

    ``autocontrast``: ``ImageOps.autocontrast``; ``brightness`` / ``sharpness``:
    ``ImageEnhance.Brightness(img).enhance(psi)`` / ``ImageEnhance.Sharpness(img).enhance(psi)``.
    """
    img = Image.fromarray(np.ascontiguousarray(patch_u8, dtype=np.uint8), mode="L")
    if name == "autocontrast":
        out = ImageOps.autocontrast(img)
    elif name == "brightness":
        out = ImageEnhance.Brightness(img).enhance(psi)
    elif name == "sharpness":
        out = ImageEnhance.Sharpness(img).enhance(psi)
    else:
        raise FsmetaError(f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)}")
    return np.asarray(out, dtype=np.uint8)


def _logits(model: SegmentationModel, patches: np.ndarray, ctx: ScoreContext) -> torch.Tensor:
    """Logits (N, 1, H, W) of [0, 1] patches (N, H, W), in batches of ``ctx.batch_size``, fp32 on the host."""
    out = []
    device = next(model.parameters()).device  # a model on a GPU scores there; results come back to the CPU
    cl = channels_last(device, ctx.compute)
    for start in range(0, len(patches), ctx.batch_size):
        x = torch.from_numpy(normalise(np.ascontiguousarray(patches[start : start + ctx.batch_size], dtype=np.float32)))[:, None]
        with autocast(device, ctx.compute):
            logits = model(to_device(x, device, cl))
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 1) + patches.shape[1:])


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample mean binary entropy of σ(logits), stable at saturated logits. (N, 1, H, W) → (N,)."""
    h = -(torch.sigmoid(logits) * F.logsigmoid(logits) + torch.sigmoid(-logits) * F.logsigmoid(-logits))
    return h.flatten(1).mean(1)


def _entropy_of_probability(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return (-(p * p.log() + (1 - p) * (1 - p).log())).flatten(1).mean(1)


def random_score(model: SegmentationModel, patches: np.ndarray, ctx: ScoreContext) -> np.ndarray:
    """Uniform [0, 1) draws from ``(seed, key)``; every patch equally likely to be chosen."""
    return np.random.default_rng([ctx.seed, ctx.key, 17]).random(len(patches))


@torch.no_grad()
def entropy_score(model: SegmentationModel, patches: np.ndarray, ctx: ScoreContext) -> np.ndarray:
    model.eval()
    return binary_entropy(_logits(model, patches, ctx)).numpy().astype(np.float64)


@torch.no_grad()
def mc_dropout_score(model: SegmentationModel, patches: np.ndarray, ctx: ScoreContext) -> np.ndarray:
    """Entropy of the mean of ``passes`` dropout predictions; dropout seeded by ``(seed, key)``."""
    dropout = getattr(model, "dropout", None)
    if not isinstance(dropout, torch.nn.Dropout2d):
        raise FsmetaError(f"{type(model).__name__} has no Dropout2d before its last conv; MC-dropout needs one")
    if ctx.dropout <= 0.0:
        raise FsmetaError("MC-dropout needs select.dropout > 0 (0 makes every pass identical)")
    model.eval()
    old_p = dropout.p
    dropout.p = ctx.dropout
    dropout.train()
    try:
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(np.random.default_rng([ctx.seed, ctx.key, 29]).integers(2**62)))
            mean = None
            for _ in range(ctx.passes):
                p = torch.sigmoid(_logits(model, patches, ctx))
                mean = p if mean is None else mean + p
        return _entropy_of_probability(mean / ctx.passes).numpy().astype(np.float64)
    finally:
        dropout.p = old_p
        dropout.eval()


@torch.no_grad()
def consistency_score(model: SegmentationModel, patches: np.ndarray, ctx: ScoreContext) -> np.ndarray:
    """Σ over augmentations A of weighted BCE(logits on A(x), [σ(logits on x) ≥ 0.5]), per patch (Eq. 4)."""
    model.eval()
    u8 = np.stack([to_uint8(p) for p in patches]) if len(patches) else np.zeros((0,) + patches.shape[1:], np.uint8)
    scale = np.float32(1.0 / 255.0)
    target = torch.sigmoid(_logits(model, u8 * scale, ctx))
    if ctx.hard_target:
        target = (target >= 0.5).float()
    total = np.zeros(len(patches), dtype=np.float64)
    for name in AUGMENTATIONS:
        aug = np.stack([augment(p, name, ctx.psi) for p in u8]) * scale
        logits = _logits(model, aug, ctx)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if ctx.weighted:
            bce = bce * _foreground_weight(target)
        total += bce.flatten(1).mean(1).double().numpy()
    return total


def _foreground_weight(target: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights (N, 1, H, W): w = #background / #foreground of each patch's target on its
    foreground, 1 on background (SPEC §4.2); w = 1 when the target has no foreground *or no
    background* — §4.2's w = 0 for an all-foreground mask would give a patch predicted all
    foreground a score of 0 whatever the augmentations do to it."""
    n = target[0].numel()
    n_fg = target.flatten(1).sum(1).view(-1, 1, 1, 1)
    w = torch.where((n_fg > 0) & (n_fg < n), (n - n_fg) / n_fg.clamp_min(1e-12), torch.ones_like(n_fg))
    return 1 + (w - 1) * target


@torch.no_grad()
def embed_patches(model: SegmentationModel, patches: np.ndarray, ctx: ScoreContext) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, C) float64, foreground (N,) float64) of [0, 1] patches (N, H, W): the model's
    bottleneck features averaged over space, scaled to unit length, and the share of pixels it
    predicts as foreground (p ≥ 0.5). For set-level selection (:mod:`fsmeta.select.diversity`)."""
    model.eval()
    device = next(model.parameters()).device
    cl = channels_last(device, ctx.compute)
    feats, shares = [], []
    for start in range(0, len(patches), ctx.batch_size):
        x = torch.from_numpy(normalise(np.ascontiguousarray(patches[start : start + ctx.batch_size], dtype=np.float32)))[:, None]
        with autocast(device, ctx.compute):
            logits, latent = model.forward_with_latent(to_device(x, device, cl))
        f = latent.float().mean(dim=(2, 3))
        feats.append(F.normalize(f, dim=1).cpu().double())
        shares.append((logits.float() >= 0).flatten(1).double().mean(1).cpu())
    if not feats:
        return np.zeros((0, 0)), np.zeros(0)
    return torch.cat(feats).numpy(), torch.cat(shares).numpy()


Scorer = Callable[[SegmentationModel, np.ndarray, ScoreContext], np.ndarray]

SCORERS: dict[str, Scorer] = {
    "random": random_score,
    "entropy": entropy_score,
    "mc-dropout": mc_dropout_score,
    "consistency": consistency_score,
}


def score_patches(method: str, model: SegmentationModel, patches: np.ndarray, ctx: ScoreContext) -> np.ndarray:
    """Scores (N,) float64 of patches (N, H, W) in [0, 1] by ``method``; higher = annotate first."""
    try:
        scorer = SCORERS[method]
    except KeyError:
        raise FsmetaError(f"unknown selection method {method!r}; choose one of {', '.join(SCORERS)}") from None
    patches = np.asarray(patches, dtype=np.float32)
    if patches.ndim != 3:
        raise FsmetaError(f"scorers take a stack of (H, W) patches, got shape {patches.shape}")
    return scorer(model, patches, ctx)
