"""Pieces shared by the segmentation models: padding to the network stride and
the batch-norm protocol of Dawoud et al. 2020 (§4.1 of the spec)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, affine: bool, bias: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=bias),
        nn.BatchNorm2d(cout, affine=affine),
        nn.ReLU(inplace=True),
    )


class SegmentationModel(nn.Module):
    """Base class: pads any input to a multiple of ``stride`` and crops the logits back.

    Subclasses implement ``_forward(x) -> (logits, latent)`` on padded input.
    """

    stride: int = 1

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_with_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, 1, H, W) and the latent features used by the distillation loss."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected input of shape (B, 1, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            # Reflection keeps image statistics at the border; it needs the pad smaller than the side.
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        logits, latent = self._forward(x)
        return logits[..., :h, :w], latent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_latent(x)[0]


def make_bn_affine(model: nn.Module) -> nn.Module:
    """Turn every non-affine BatchNorm into an affine one with scale 1 and shift 0, in place.

    The function the model computes is unchanged (γ=1, β=0 is the identity), so
    fine-tuning starts from exactly the meta-learned function while gaining the
    scale and shift parameters to learn. Running statistics are kept.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine:
            ref = module.running_mean if module.running_mean is not None else torch.empty(module.num_features)
            module.affine = True
            module.weight = nn.Parameter(torch.ones(module.num_features, dtype=ref.dtype, device=ref.device))
            module.bias = nn.Parameter(torch.zeros(module.num_features, dtype=ref.dtype, device=ref.device))
    return model


def is_bn_affine(model: nn.Module) -> bool:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return bool(bns) and all(m.affine for m in bns)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


StateDict = dict[str, torch.Tensor]


def clone_state(model: nn.Module) -> StateDict:
    """A detached copy of every weight and buffer of ``model`` (θ as the algorithms pass it around)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
