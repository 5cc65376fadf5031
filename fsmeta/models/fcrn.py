"""FCRN (Xie et al. 2018, as modified by Dawoud et al. 2020).

Encoder: conv3x3 (no bias) + BN + ReLU with channels 1→32→64→128, each followed by
a 2x2 max-pool, then 128→512 conv3x3 + BN + ReLU (the latent, at H/8). Decoder:
ConvTranspose 2x2 stride 2 (no bias) + BN + ReLU 512→128→64→32, then conv3x3 32→1
with bias. 985,665 parameters with non-affine batch norm.
"""

from __future__ import annotations

import torch
from torch import nn

from fsmeta.models.common import SegmentationModel, conv_bn_relu


class FCRN(SegmentationModel):
    """Fully convolutional regression network producing per-pixel logits.

    Shape:
        input (B, 1, H, W) with any H, W; logits (B, 1, H, W); latent (B, 512, ⌈H/8⌉, ⌈W/8⌉).
    """

    stride = 8

    def __init__(self, affine: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.enc1 = conv_bn_relu(1, 32, affine, bias=False)
        self.enc2 = conv_bn_relu(32, 64, affine, bias=False)
        self.enc3 = conv_bn_relu(64, 128, affine, bias=False)
        self.bottleneck = conv_bn_relu(128, 512, affine, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.dec3 = _up_bn_relu(512, 128, affine)
        self.dec2 = _up_bn_relu(128, 64, affine)
        self.dec1 = _up_bn_relu(64, 32, affine)
        # Dropout before the last conv only matters for MC-dropout scoring (p = 0 is identity).
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(32, 1, 3, padding=1, bias=True)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool(self.enc1(x))
        x = self.pool(self.enc2(x))
        x = self.pool(self.enc3(x))
        latent = self.bottleneck(x)
        y = self.dec1(self.dec2(self.dec3(latent)))
        return self.head(self.dropout(y)), latent


def _up_bn_relu(cin: int, cout: int, affine: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False),
        nn.BatchNorm2d(cout, affine=affine),
        nn.ReLU(inplace=True),
    )
