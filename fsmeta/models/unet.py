"""Lightweight 12-layer U-Net of Dawoud et al. 2020.

double_conv (conv3x3 + BN + ReLU, twice) 1→32, max-pool, 32→64, max-pool, 64→128
(the latent, at H/4); decoder: bilinear ×2 up, concat with the skip, double_conv
192→64; up, concat, 96→32; conv1x1 32→1. 470,977 parameters with non-affine BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsmeta.models.common import SegmentationModel, conv_bn_relu


def double_conv(cin: int, cout: int, affine: bool) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(cin, cout, affine, bias=True), conv_bn_relu(cout, cout, affine, bias=True))


class UNet(SegmentationModel):
    """Shape: input (B, 1, H, W), any H, W; logits (B, 1, H, W); latent (B, 128, ⌈H/4⌉, ⌈W/4⌉)."""

    stride = 4

    def __init__(self, affine: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.down1 = double_conv(1, 32, affine)
        self.down2 = double_conv(32, 64, affine)
        self.down3 = double_conv(64, 128, affine)
        self.pool = nn.MaxPool2d(2)
        self.up2 = double_conv(128 + 64, 64, affine)
        self.up1 = double_conv(64 + 32, 32, affine)
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(32, 1, 1)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s1 = self.down1(x)
        s2 = self.down2(self.pool(s1))
        latent = self.down3(self.pool(s2))
        y = self.up2(torch.cat([_up(latent), s2], dim=1))
        y = self.up1(torch.cat([_up(y), s1], dim=1))
        return self.head(self.dropout(y)), latent


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
