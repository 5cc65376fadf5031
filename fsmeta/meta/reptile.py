"""Reptile with weighted BCE, entropy regularisation and distillation (Dawoud et al. 2020, Alg. 1).

The seam that the execution layer distributes is :func:`adapt`: a pure function
of (θ, task batch, settings) returning θ'. It runs unchanged in-process and on
Ray actors, and the driver forms the meta-update :func:`meta_update` from the
returned weights, so where a task ran never changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fsmeta.augment import augmentation
from fsmeta.config import AugmentConfig, ComputeConfig, Config
from fsmeta.losses import distillation, entropy_regulariser, weighted_bce
from fsmeta.models import SegmentationModel, StateDict, clone_state
from fsmeta.step import TrainingStep


@dataclass(frozen=True)
class InnerSettings:
    """Hyper-parameters of one inner loop (fresh Adam each call)."""

    steps: int
    lr: float
    weight_decay: float
    alpha: float  # weight of the entropy regulariser; 0 disables it
    beta: float  # weight of the distillation loss; 0 disables it
    entropy: str = "paper"
    augment: AugmentConfig | None = None  # per-step augmentation of the task's crops; None: none

    @classmethod
    def from_config(cls, cfg: Config) -> "InnerSettings":
        """The inner loop of ``cfg.meta``, with the variant's (α, β) in force."""
        alpha, beta = cfg.meta.loss_weights()
        m = cfg.meta
        return cls(m.inner_steps, m.inner_lr, m.weight_decay, alpha, beta, m.entropy,
                   cfg.augment if cfg.augment.meta else None)


@dataclass
class TaskBatch:
    """Tensors of one task: K labelled crops of source m, K unlabelled crops of n and of p.

    Shape: x, y, x_n, x_p all (K, 1, S, S); x in [-1, 1], y in {0, 1}. ``key`` identifies
    the task (seed, iteration, source) and seeds its augmentation.
    """

    x: torch.Tensor
    y: torch.Tensor
    x_n: torch.Tensor
    x_p: torch.Tensor
    key: tuple[int, ...] = ()

    @classmethod
    def from_numpy(cls, x: np.ndarray, y: np.ndarray, x_n: np.ndarray, x_p: np.ndarray, key: tuple[int, ...] = ()) -> "TaskBatch":
        return cls(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x, y, x_n, x_p)), key=tuple(key))


@dataclass
class AdaptResult:
    theta: StateDict
    losses: dict[str, float]  # mean over the inner steps of each loss term


def adapt(model: SegmentationModel, theta: StateDict, batch: TaskBatch, settings: InnerSettings, where: str = "",
          compute: ComputeConfig | None = None) -> AdaptResult:
    """Run ``settings.steps`` Adam steps on L = BCE + α·ER + β·D from θ and return θ'.

    ``model`` is only a workspace of the right architecture, on the device to run on
    (placed there with :func:`fsmeta.compute.prepare_model`): its weights and buffers
    are overwritten with θ first, so calling twice with the same arguments gives the
    same θ' bit for bit (on the same device and thread count). The batch follows the
    model to its device; θ' stays there. Batch norm is in training mode, so its
    running statistics adapt too and are returned in θ' with the weights (Reptile
    averages both).

    ``compute`` (default: :class:`~fsmeta.config.ComputeConfig`'s) sets autocast and
    the memory format; the losses are computed in fp32. Loss values are read back
    once, after the last step, so the finiteness check names the first bad step but
    fires only then.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (names ``where`` and the step).
    """
    model.load_state_dict(theta)
    model.train()
    # With augmentation, each inner step sees the task's crops under a fresh seeded transform:
    # image and mask share one symmetry per crop, the unlabelled crops get their own.
    transform = augmentation(settings.augment, batch.key, paired=2, masks=(1,)) if settings.augment else None
    step = TrainingStep(model, lr=settings.lr, weight_decay=settings.weight_decay, compute=compute, transform=transform)
    # The task's crops serve every inner step: moved to the device once.
    x, y, x_n, x_p = step.to_device(batch.x, batch.y, batch.x_n, batch.x_p)
    zero = torch.zeros((), device=step.device)

    def loss_fn(forward, x, y, x_n, x_p):
        # Forward passes and loss terms in this order: batch norm's running statistics and the
        # order in which gradients accumulate both depend on it.
        logits, latent_m = forward(x)
        bce = weighted_bce(logits, y)
        loss, er, d = bce, zero, zero
        if settings.alpha > 0.0:
            er = entropy_regulariser(forward(x_n)[0], settings.entropy)
            loss = loss + settings.alpha * er
        if settings.beta > 0.0:
            d = distillation(latent_m, forward(x_p)[1])
            loss = loss + settings.beta * d
        return loss, bce, er, d

    for _ in range(settings.steps):
        step(loss_fn, x, y, x_n, x_p)

    def describe(i: int, terms: tuple[float, ...]) -> str:
        value, bce_v, er_v, d_v = terms
        return (f"loss is {value} at inner step {i}{' of ' + where if where else ''} "
                f"(bce={bce_v:.4g}, er={er_v:.4g}, d={d_v:.4g}); lower inner_lr or the loss weights")

    rows = step.read_losses(describe)
    sums = {name: sum(row[k] for row in rows) for k, name in enumerate(("loss", "bce", "er", "d"))}
    return AdaptResult(clone_state(model), {k: v / settings.steps for k, v in sums.items()})


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
