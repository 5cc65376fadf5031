"""Seeded data augmentation for the training step (:class:`fsmeta.step.TrainingStep`'s ``transform``).

Per crop: one of the eight symmetries of the square (a flip and a multiple of 90°,
applied to the image and its mask together), and a small intensity jitter of the
image only — contrast ``x ← c·x`` and brightness ``x ← x + b`` on the normalised
[-1, 1] scale, with ``c`` uniform in [1 − contrast, 1 + contrast] and ``b`` uniform
in [−brightness, brightness]. Microscopy images have no preferred orientation, and
stain, illumination and camera gain vary between acquisitions; both are standard
for few-shot and small-data segmentation (nnU-Net's default augmentation includes
mirroring, rotations, brightness and contrast; Isensee et al., Nature Methods 2021).

Every draw comes from ``numpy.random.default_rng([*key, step])``, with ``key`` the
caller's identity of the batch stream (a fine-tune's seed; a meta-training task's
seed, iteration and source), so results are reproducible and the Ray and sequential
backends stay bit-identical. The transform runs on the device tensors; geometric
transforms are exact permutations of pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fsmeta.config import AugmentConfig

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Augment:
    """A :class:`~fsmeta.step.TrainingStep` transform.

    Args:
        cfg: which augmentations and how strong.
        key: seeds of this batch stream (ints).
        paired: how many leading tensors of a batch share one geometric transform per crop
            (2: image and mask); the rest are unlabelled images, transformed on their own.
        masks: indices of the tensors that are masks (geometry only, never jittered).
    """

    cfg: AugmentConfig
    key: tuple[int, ...]
    paired: int = 2
    masks: tuple[int, ...] = (1,)

    def __call__(self, step: int, batch: Batch) -> Batch:
        rng = np.random.default_rng([*self.key, 104729, step])
        out = list(batch)
        # One geometric draw for the paired tensors, one for each unpaired tensor.
        groups: list[Sequence[int]] = [range(min(self.paired, len(batch)))] + [[i] for i in range(self.paired, len(batch))]
        for group in groups:
            n = batch[group[0]].shape[0]
            flips = rng.integers(0, 2, n) if self.cfg.flips else np.zeros(n, dtype=np.int64)
            turns = rng.integers(0, 4, n) if self.cfg.rot90 else np.zeros(n, dtype=np.int64)
            if batch[group[0]].shape[-1] != batch[group[0]].shape[-2]:
                turns = 2 * (turns % 2)  # a non-square crop keeps its shape: half turns only
            for i in group:
                out[i] = _symmetries(out[i], flips, turns)
        for i, t in enumerate(out):
            if i in self.masks or (self.cfg.contrast == 0.0 and self.cfg.brightness == 0.0):
                continue
            n = t.shape[0]
            c = rng.uniform(1.0 - self.cfg.contrast, 1.0 + self.cfg.contrast, n).astype(np.float32)
            b = rng.uniform(-self.cfg.brightness, self.cfg.brightness, n).astype(np.float32)
            shape = (n,) + (1,) * (t.ndim - 1)
            out[i] = t * torch.from_numpy(c).to(t.device).view(shape) + torch.from_numpy(b).to(t.device).view(shape)
        return tuple(out)


def _symmetries(t: torch.Tensor, flips: np.ndarray, turns: np.ndarray) -> torch.Tensor:
    """Crop k of ``t`` (N, C, S, S) flipped left–right if ``flips[k]``, then turned ``turns[k]`` × 90°."""
    if not flips.any() and not turns.any():
        return t
    parts = []
    for k in range(t.shape[0]):
        x = t[k]
        if flips[k]:
            x = torch.flip(x, dims=(-1,))
        if turns[k]:
            x = torch.rot90(x, int(turns[k]), dims=(-2, -1))
        parts.append(x)
    out = torch.stack(parts)
    if t.is_contiguous(memory_format=torch.channels_last) and t.ndim == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def augmentation(cfg: AugmentConfig, key: Sequence[int], paired: int = 2, masks: tuple[int, ...] = (1,)) -> Augment | None:
    """The transform for one batch stream, or None when ``cfg`` turns nothing on."""
    if not (cfg.flips or cfg.rot90 or cfg.contrast > 0.0 or cfg.brightness > 0.0):
        return None
    return Augment(cfg, tuple(int(k) for k in key), paired, masks)


__all__ = ["Augment", "augmentation"]
