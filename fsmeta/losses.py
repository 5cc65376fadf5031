"""Loss terms of the few-shot meta-learning objective (Dawoud et al. 2020).

All functions take *logits* (pre-sigmoid) and are numerically stable at extreme logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["weighted_bce", "entropy_regulariser", "distillation", "ENTROPY_FORMS"]

ENTROPY_FORMS: tuple[str, ...] = ("paper", "binary")


def weighted_bce(logits: Tensor, masks: Tensor) -> Tensor:
    """Binary cross-entropy with a per-image foreground weight.

    For image ``b`` the foreground weight is ``w_b = #background / #foreground`` of its own
    mask, so the (usually rare) cell pixels count as much in total as the background. A mask
    with no foreground gets ``w_b = 1`` (plain BCE). An all-foreground mask gets
    ``w_b = 0 / n = 0``, exactly what the formula gives: such an image contributes no loss.
    The weights are computed without gradient.

    Per pixel: ``-[w_b * y * log σ(z) + (1 - y) * log(1 - σ(z))]``, evaluated stably from the
    logits by ``F.binary_cross_entropy_with_logits``; reduced by the mean over all pixels of
    all images.

    Args:
        logits: raw network outputs ``z``.
        masks: binary ground truth in {0, 1}, any numeric dtype (float, uint8, bool).

    Shape:
        - logits: ``(B, 1, H, W)``
        - masks: ``(B, 1, H, W)``
        - output: scalar

    Reference:
        Dawoud, Hornauer, Carneiro & Belagiannis, "Few-Shot Microscopy Image Cell
        Segmentation", ECML-PKDD 2020, Eq. 3.
    """
    if logits.shape != masks.shape:
        raise ValueError(
            f"logits and masks must have the same shape, got {tuple(logits.shape)} "
            f"and {tuple(masks.shape)}"
        )
    with torch.no_grad():
        y = masks.detach().to(logits.dtype)
        dims = tuple(range(1, y.ndim))
        n_fg = y.sum(dim=dims, keepdim=True)
        n_bg = y[0].numel() - n_fg
        w = torch.where(n_fg > 0, n_bg / n_fg.clamp_min(1), torch.ones_like(n_fg))
        pixel_weight = 1 + (w - 1) * y  # w_b on foreground, 1 on background
    return F.binary_cross_entropy_with_logits(logits, y, weight=pixel_weight, reduction="mean")


def prior_threshold(masks: Tensor) -> float:
    """The probability threshold that undoes :func:`weighted_bce`'s shift of the decision boundary.

    Weighting foreground pixels by ``w`` makes the loss's minimiser ``p_w = w·p / (w·p + 1 − p)``
    for a true foreground probability ``p``, so ``p ≥ 1/2`` becomes ``p_w ≥ w / (1 + w)``
    (threshold moving for cost-sensitive learning; Elkan, IJCAI 2001). ``w`` is the weight the
    foreground of these masks received overall: background over foreground pixels of the crops
    that have foreground. Masks with no foreground at all give 0.5.

    Shape:
        - masks: ``(B, 1, H, W)`` in {0, 1}
    """
    y = masks.detach().float().flatten(1)
    fg = y.sum(1)
    has = fg > 0
    if not bool(has.any()):
        return 0.5
    w = float((y.shape[1] - fg[has]).sum() / fg[has].sum())
    return w / (1.0 + w)


def entropy_regulariser(logits: Tensor, form: str = "paper") -> Tensor:
    """Mean entropy of the predicted foreground probabilities ``p = σ(z)``.

    ``form="paper"`` uses the paper's ``H(p) = -p log p``; ``form="binary"`` uses the full
    Bernoulli entropy ``-p log p - (1 - p) log(1 - p)``. ``log p`` and ``log(1 - p)`` are taken
    as ``logsigmoid(z)`` and ``logsigmoid(-z)``, and ``1 - p`` as ``σ(-z)``, so value and
    gradient stay finite for saturated logits (``|z|`` of 100 or 1e4), where
    ``log(sigmoid(z))`` would give ``0 * -inf = NaN``.

    Args:
        logits: raw network outputs ``z``.
        form: ``"paper"`` or ``"binary"``.

    Shape:
        - logits: ``(B, 1, H, W)`` (any shape works)
        - output: scalar, the mean over all pixels and images

    Reference:
        Dawoud et al. 2020, Eq. 4.
    """
    if form not in ENTROPY_FORMS:
        valid = ", ".join(ENTROPY_FORMS)
        raise ValueError(f"unknown entropy form {form!r}; valid forms: {valid}")
    h = -torch.sigmoid(logits) * F.logsigmoid(logits)
    if form == "binary":
        h = h - torch.sigmoid(-logits) * F.logsigmoid(-logits)
    return h.mean()


def distillation(latent_a: Tensor, latent_b: Tensor) -> Tensor:
    """Mean squared distance between every latent of source ``m`` and every latent of source ``p``.

    Value: ``1/(Ka Kb) Σ_i Σ_j ||a_i - b_j||² / (C h w)``, computed in ``O(Ka + Kb)`` with the
    exact identity ``mean_ij ||a_i - b_j||² = mean_i ||a_i - ā||² + mean_j ||b_j - b̄||² +
    ||ā - b̄||²`` (``ā``, ``b̄`` the batch means). Each term is a sum of squares, so the form is
    also numerically stable (no cancellation of large terms).

    Dividing by the number of feature elements ``C h w`` makes the loss independent of the
    crop size, so a weight such as ``β = 0.01`` means the same at 64×64 and 256×256 inputs.

    Args:
        latent_a: encoder features of ``Ka`` images from source ``m``.
        latent_b: encoder features of ``Kb`` images from source ``p``.

    Shape:
        - latent_a: ``(Ka, C, h, w)``
        - latent_b: ``(Kb, C, h, w)``; must match ``latent_a`` beyond the batch dimension
        - output: scalar

    Reference:
        Dawoud et al. 2020, Eq. 5.
    """
    if latent_a.shape[1:] != latent_b.shape[1:]:
        raise ValueError(
            f"latents must match beyond the batch dimension, got {tuple(latent_a.shape)} "
            f"and {tuple(latent_b.shape)}"
        )
    if latent_a.shape[0] == 0 or latent_b.shape[0] == 0:
        raise ValueError(
            f"latents need at least one sample each, got {tuple(latent_a.shape)} "
            f"and {tuple(latent_b.shape)}"
        )
    mean_a = latent_a.mean(dim=0)
    mean_b = latent_b.mean(dim=0)
    spread_a = (latent_a - mean_a).pow(2).mean()
    spread_b = (latent_b - mean_b).pow(2).mean()
    return spread_a + spread_b + (mean_a - mean_b).pow(2).mean()
