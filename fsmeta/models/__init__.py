"""Segmentation models (pure torch) and the registry that builds them by name."""

from __future__ import annotations

from typing import Callable

from fsmeta.models.common import (
    SegmentationModel, StateDict, clone_state, count_parameters, fold_batch_norm, is_bn_affine, make_bn_affine,
)
from fsmeta.models.fcrn import FCRN
from fsmeta.models.tta import DihedralTTA
from fsmeta.models.unet import UNet

ARCHITECTURES: dict[str, Callable[..., SegmentationModel]] = {"fcrn": FCRN, "unet": UNet}


def build_model(arch: str, *, affine: bool = False, dropout: float = 0.0) -> SegmentationModel:
    """Build a model by name (``fcrn`` or ``unet``).

    Args:
        arch: architecture name.
        affine: affine batch norm (fine-tuning) or running statistics only (pre-training).
        dropout: Dropout2d probability before the last conv (MC-dropout scoring); 0 disables it.
    """
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}") from None
    return factory(affine=affine, dropout=dropout)


__all__ = [
    "ARCHITECTURES", "DihedralTTA", "FCRN", "UNet", "SegmentationModel", "StateDict", "build_model", "clone_state", "fold_batch_norm",
    "count_parameters", "is_bn_affine", "make_bn_affine",
]
