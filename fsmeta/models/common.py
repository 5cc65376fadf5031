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


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with every batch norm folded into the (transposed)
    convolution before it, as ``W' = W·γ/√(σ²+ε)``, ``b' = β + (b − μ)·γ/√(σ²+ε)`` per output
    channel; the batch norm becomes the identity. The same function as ``model.eval()``
    up to float rounding, one elementwise pass fewer per layer. The copy is in eval mode.
    """
    import copy

    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        layers = list(seq)
        for i in range(len(layers) - 1):
            conv, bn = layers[i], layers[i + 1]
            if not (isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bn, nn.BatchNorm2d)):
                continue
            with torch.no_grad():
                scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                out_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0  # ConvTranspose2d: (in, out, kh, kw)
                shape = [1] * conv.weight.ndim
                shape[out_dim] = -1
                conv.weight.mul_(scale.view(shape))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                new_bias = shift + (bias - bn.running_mean) * scale
                if conv.bias is None:
                    conv.bias = nn.Parameter(new_bias)
                else:
                    conv.bias.copy_(new_bias)
            seq[i + 1] = nn.Identity()
    return folded

