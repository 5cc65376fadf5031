"""Reptile with weighted BCE, entropy regularisation and distillation (Dawoud et al. 2020, Alg. 1).

The seam that the execution layer distributes is :func:`adapt`: a pure function
of (θ, task batch, settings) returning θ'. It runs unchanged in-process and on
Ray actors, and the driver forms the meta-update :func:`meta_update` from the
returned weights, so where a task ran never changes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fsmeta.errors import NonFiniteLossError
from fsmeta.losses import distillation, entropy_regulariser, weighted_bce
from fsmeta.models import SegmentationModel

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class InnerSettings:
    """Hyper-parameters of one inner loop (fresh Adam each call)."""

    steps: int
    lr: float
    weight_decay: float
    alpha: float  # weight of the entropy regulariser; 0 disables it
    beta: float  # weight of the distillation loss; 0 disables it
    entropy: str = "paper"


@dataclass
class TaskBatch:
    """Tensors of one task: K labelled crops of source m, K unlabelled crops of n and of p.

    Shape: x, y, x_n, x_p all (K, 1, S, S); x in [-1, 1], y in {0, 1}.
    """

    x: torch.Tensor
    y: torch.Tensor
    x_n: torch.Tensor
    x_p: torch.Tensor

    @classmethod
    def from_numpy(cls, x: np.ndarray, y: np.ndarray, x_n: np.ndarray, x_p: np.ndarray) -> "TaskBatch":
        return cls(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x, y, x_n, x_p)))


@dataclass
class AdaptResult:
    theta: StateDict
    losses: dict[str, float]  # mean over the inner steps of each loss term


def adapt(model: SegmentationModel, theta: StateDict, batch: TaskBatch, settings: InnerSettings, where: str = "") -> AdaptResult:
    """Run ``settings.steps`` Adam steps on L = BCE + α·ER + β·D from θ and return θ'.

    ``model`` is only a workspace of the right architecture: its weights and
    buffers are overwritten with θ first, so calling twice with the same
    arguments gives the same θ' bit for bit (on the same device and thread count).
    Batch norm is in training mode, so its running statistics adapt too and
    are returned in θ' with the weights (Reptile averages both).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (names ``where`` and the step).
    """
    model.load_state_dict(theta)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sums = {"loss": 0.0, "bce": 0.0, "er": 0.0, "d": 0.0}
    for step in range(settings.steps):
        optimiser.zero_grad(set_to_none=True)
        logits, latent_m = model.forward_with_latent(batch.x)
        bce = weighted_bce(logits, batch.y)
        loss = bce
        er = d = None
        if settings.alpha > 0.0:
            er = entropy_regulariser(model(batch.x_n), settings.entropy)
            loss = loss + settings.alpha * er
        if settings.beta > 0.0:
            _, latent_p = model.forward_with_latent(batch.x_p)
            d = distillation(latent_m, latent_p)
            loss = loss + settings.beta * d
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at inner step {step}{' of ' + where if where else ''} "
                f"(bce={float(bce.detach()):.4g}, er={float(er.detach()) if er is not None else 0:.4g}, "
                f"d={float(d.detach()) if d is not None else 0:.4g}); lower inner_lr or the loss weights"
            )
        loss.backward()
        optimiser.step()
        sums["loss"] += value
        sums["bce"] += float(bce.detach())
        sums["er"] += float(er.detach()) if er is not None else 0.0
        sums["d"] += float(d.detach()) if d is not None else 0.0
    theta_prime = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return AdaptResult(theta_prime, {k: v / settings.steps for k, v in sums.items()})


def meta_update(theta: StateDict, adapted: list[StateDict], epsilon: float) -> StateDict:
    """θ ← θ + ε · mean_m(θ_m − θ), over weights and batch-norm running statistics alike.

    The adapted states are summed in list order, so the result depends only on
    the order of sources, never on which worker finished first. Integer buffers
    (BN's ``num_batches_tracked``) are counters, not parameters: they take the
    first adapted value.
    """
    if not adapted:
        raise ValueError("meta_update needs at least one adapted state")
    out: StateDict = {}
    for key, value in theta.items():
        if not torch.is_floating_point(value):
            out[key] = adapted[0][key].clone()
            continue
        delta = torch.zeros_like(value)
        for state in adapted:
            delta += state[key] - value
        out[key] = value + (epsilon / len(adapted)) * delta
    return out


def clone_state(model: torch.nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
