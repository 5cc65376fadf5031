"""The one training step of fsmeta: meta-training's inner loop, transfer training,
fine-tuning and the pretext task all train through :class:`TrainingStep`.

The algorithm supplies the loss (learn2learn's seam); the step does the rest —
device and memory format, autocast, the forward pass, backward, the optimiser,
and reading the losses back::

    step = TrainingStep(model, lr=1e-4, weight_decay=5e-4, compute=cfg.compute)
    for xb, yb in batches:
        step(lambda forward, x, y: weighted_bce(forward(x)[0], y), xb, yb)
    losses = step.read_losses(lambda i, terms: f"loss is {terms[0]} at step {i}")

``forward`` returns (logits, latent) in fp32 whatever the autocast dtype, so a
loss is always computed in fp32. A loss function returns the loss to minimise,
or a tuple whose first element is that loss and whose others are terms to
report (meta-training returns loss, BCE, ER and D). Loss values stay on the
device until :meth:`TrainingStep.read_losses`, which reads every step's terms
back in one transfer (on a GPU each read is a synchronisation) and stops at the
first non-finite loss.

A change of precision, optimiser, learning-rate schedule or augmentation is one edit here. ``transform``
is the per-batch hook: ``transform(step, batch) → batch`` on the device tensors
before the forward pass (e.g. seeded flips of images and masks together); it
must be a pure function of its arguments so that results stay reproducible and
the Ray and sequential backends stay identical.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

from fsmeta.compute import autocast, channels_last, forward_fn, host_values, prepare_model, to_device
from fsmeta.config import ComputeConfig
from fsmeta.errors import NonFiniteLossError
from fsmeta.models import SegmentationModel

Batch = tuple[torch.Tensor, ...]
Forward = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
LossFn = Callable[..., Union[torch.Tensor, Sequence[torch.Tensor]]]
BatchTransform = Callable[[int, Batch], Batch]
Describe = Callable[[int, tuple[float, ...]], str]


class TrainingStep:
    """One optimiser step at a time on ``model``, which trains on the device it is on.

    Args:
        model: the module to train, in the state (train/eval, affine BN) the caller wants;
            it is placed with :func:`fsmeta.compute.prepare_model` (idempotent).
        lr, weight_decay: a fresh Adam over ``model.parameters()``.
        compute: precision, memory format, compilation (default: :class:`ComputeConfig`'s).
        transform: the per-batch hook (see the module docstring); None: batches as given.
        lr_factor: the learning-rate schedule, ``lr_factor(step) → factor``: step ``step``
            (counted from 0) runs at ``lr × factor``; None: ``lr`` at every step.
    """

    def __init__(self, model: SegmentationModel, *, lr: float, weight_decay: float,
                 compute: ComputeConfig | None = None, transform: BatchTransform | None = None,
                 lr_factor: Callable[[int], float] | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.compute = compute
        prepare_model(model, self.device, compute)
        self.channels_last = channels_last(self.device, compute)
        self._forward = forward_fn(model, compute)
        self.optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.transform = transform
        self.lr = lr
        self.lr_factor = lr_factor
        self.steps = 0  # steps taken so far
        self._pending: list[tuple[torch.Tensor, ...]] = []

    def to_device(self, *tensors: torch.Tensor) -> Batch:
        """Tensors on the model's device in its memory format (host → CUDA pinned and non-blocking;
        tensors already there are returned unchanged, so a batch reused every step moves once)."""
        return tuple(to_device(t, self.device, self.channels_last) for t in tensors)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, latent) of ``x`` under autocast, returned in fp32 for the loss."""
        with autocast(self.device, self.compute):
            logits, latent = self._forward(x)
        return logits.float(), latent.float()

    def __call__(self, loss_fn: LossFn, *batch: torch.Tensor) -> None:
        """One step: ``loss_fn(forward, *batch)`` on the batch moved to the device (and transformed),
        then backward and the optimiser. Forward passes run in the order ``loss_fn`` calls them
        (batch norm's running statistics depend on it)."""
        tensors = self.to_device(*batch)
        if self.transform is not None:
            tensors = self.transform(self.steps, tensors)
        self.optimiser.zero_grad(set_to_none=True)
        out = loss_fn(self.forward, *tensors)
        terms = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        terms[0].backward()
        if self.lr_factor is not None:
            for group in self.optimiser.param_groups:
                group["lr"] = self.lr * self.lr_factor(self.steps)
        self.optimiser.step()
        self._pending.append(tuple(t.detach() for t in terms))
        self.steps += 1

    def read_losses(self, describe: Describe) -> list[tuple[float, ...]]:
        """Every term of the steps since the last read, as floats (one device → host transfer).

        Raises:
            NonFiniteLossError: with ``describe(step, terms)`` for the first step whose loss is
                NaN or infinite (``step`` counts from 0 over the life of this object).
        """
        pending, self._pending = self._pending, []
        if not pending:
            return []
        width = len(pending[0])
        flat = host_values([t for terms in pending for t in terms])
        rows = [tuple(flat[i * width:(i + 1) * width]) for i in range(len(pending))]
        first = self.steps - len(rows)
        for k, row in enumerate(rows):
            if not math.isfinite(row[0]):
                raise NonFiniteLossError(describe(first + k, row))
        return rows


__all__ = ["Batch", "BatchTransform", "Forward", "LossFn", "TrainingStep"]
