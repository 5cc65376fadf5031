"""Test-time augmentation over the eight symmetries of the square (flips and 90° turns).

Cell images have no preferred orientation, so the mean prediction over the dihedral group
is a prediction of the same model with less variance — nnU-Net's test-time mirroring
(Isensee et al., Nature Methods 2021) with the turns added, as fsmeta's fine-tuning
augments with both. The wrapper is itself a model (logits in, logits out), so every path
that predicts (evaluation, tiled and streamed prediction) uses it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

# the eight dihedral transforms: k quarter turns, then an optional horizontal flip
DIHEDRAL = tuple((k, flip) for k in range(4) for flip in (False, True))
# the four mirrorings alone (no turn or a half turn, with or without the flip): nnU-Net's and
# Cellpose's test-time augmentation; measured against DIHEDRAL in docs/results.md (issue 19)
MIRRORS = ((0, False), (0, True), (2, False), (2, True))


class DihedralTTA(nn.Module):
    """``model`` averaged over ``transforms`` (default :data:`DIHEDRAL`): the logit of the mean
    foreground probability.

    Each transform is undone on its output before averaging, so a prediction stays aligned with
    its input; one forward pass per transform. Returns float32 logits (the mean probability is
    kept within [1e-6, 1 − 1e-6] so its logit is finite).
    """

    def __init__(self, model: nn.Module, transforms: tuple[tuple[int, bool], ...] = DIHEDRAL):
        super().__init__()
        self.model = model
        self.transforms = tuple(transforms)
        self.stride = int(getattr(model, "stride", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for k, flip in self.transforms:
            a = torch.rot90(x, k, (2, 3))
            a = a.flip(3) if flip else a
            p = torch.sigmoid(self.model(a).float())
            p = p.flip(3) if flip else p
            p = torch.rot90(p, -k, (2, 3))
            total = p if total is None else total + p
        return torch.logit(total / len(self.transforms), eps=1e-6)
