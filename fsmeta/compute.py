"""The device side of every training and inference loop: precision, memory format, compilation, transfers.

Meta-training (:func:`fsmeta.meta.reptile.adapt`), transfer training, fine-tuning
and pretext training share one step shape::

    model = prepare_model(model, device, compute)        # once: device, memory format, cuDNN, compile
    forward = forward_fn(model, compute)                 # model.forward_with_latent, compiled or not
    x = to_device(x, device, channels_last(device, compute))
    with autocast(device, compute):
        logits, latent = forward(x)
    loss = weighted_bce(logits.float(), y)               # losses in fp32, always

With :class:`~fsmeta.config.ComputeConfig`'s defaults (``amp=auto``,
``channels_last=auto``) precision follows the hardware: bf16 autocast and
channels_last on CUDA and on a CPU with native bf16 (AVX-512 BF16 or AMX,
:func:`cpu_has_native_bf16`; about 3× faster training on such a CPU); fp32 with
channels_last on any other x86-64 CPU (oneDNN's channels_last convolutions, 1.2–1.4×
faster steps than the default memory format on an AVX2 EPYC without bf16,
docs/benchmarks.md); and with ``amp=off, channels_last=off`` (or on another CPU
without native bf16) the exact fp32 path: no autocast, the default memory format,
``.float()`` and ``.to("cpu")`` no-ops. Weights stay fp32 (autocast, not a bf16
model); losses and the Reptile meta-update are fp32.

Loss values are read back to the host once per epoch or per inner loop
(:func:`host_values`), not once per step: on a GPU each read is a
synchronisation that stalls the queue of kernels.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from typing import Callable, ContextManager, Sequence

import torch

from fsmeta.config import ComputeConfig
from fsmeta.models import SegmentationModel, fold_batch_norm

Forward = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def default_device() -> torch.device:
    """CUDA when this process can see a GPU (in a Ray task or actor: the one Ray assigned), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this processor computes bf16 natively (AVX-512 BF16 or AMX), as torch's CPU
    capability probe reports it, else as the kernel lists the CPU's flags. A CPU without
    it would emulate bf16, slower than fp32."""
    probe = getattr(torch, "cpu", None)
    try:
        return bool(probe._is_avx512_bf16_supported() or probe._is_amx_tile_supported())  # type: ignore[union-attr]
    except AttributeError:  # a torch without the probe: read the flags
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def _native_bf16(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def autocast_dtype(device: torch.device, compute: ComputeConfig | None = None) -> torch.dtype | None:
    """The autocast dtype on ``device``, or None for fp32: ``auto`` is bf16 where the device computes
    it natively (CUDA, a CPU with AVX-512 BF16 or AMX), ``bf16`` everywhere, ``off`` nowhere."""
    amp = (compute or ComputeConfig()).amp
    if amp == "off" or (amp == "auto" and not _native_bf16(device)):
        return None
    return torch.bfloat16


def autocast(device: torch.device, compute: ComputeConfig | None = None) -> ContextManager:
    """The autocast context for forward passes on ``device``; a no-op context for fp32."""
    dtype = autocast_dtype(device, compute)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def channels_last(device: torch.device, compute: ComputeConfig | None = None) -> bool:
    """Whether models and batches on ``device`` use the channels_last memory format (``auto``: where
    bf16 is native, as for :func:`autocast_dtype`, as oneDNN's bf16 convolutions want it, and on
    every x86-64 CPU, where oneDNN's fp32 convolutions are faster in it too; docs/benchmarks.md)."""
    mode = (compute or ComputeConfig()).channels_last
    return mode == "on" or (mode == "auto" and (_native_bf16(device) or (device.type == "cpu" and _x86_64())))


@functools.cache
def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def prepare_model(model: SegmentationModel, device: torch.device, compute: ComputeConfig | None = None) -> SegmentationModel:
    """Move ``model`` to ``device`` in place and set its memory format; switch on cuDNN autotuning on CUDA.

    Returns the same module. Safe to call again (e.g. after :func:`fsmeta.models.make_bn_affine`
    added parameters): each step is idempotent. Compilation is separate (:func:`forward_fn`),
    so the module itself, its state dict and deep copies stay plain.
    """
    compute = compute or ComputeConfig()
    if device.type == "cuda" and compute.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if channels_last(device, compute):
        model.to(memory_format=torch.channels_last)
    return model


def inference_model(model: SegmentationModel, compute: ComputeConfig | None = None) -> SegmentationModel:
    """The model to predict with on its device: under bf16 autocast or channels_last a copy with
    batch norm folded into the convolutions (:func:`fsmeta.models.fold_batch_norm`; tiled
    prediction 1.34× faster under bf16 on an AVX-512 BF16 CPU, and 1.29× on top of channels_last's
    1.88× in fp32 on an AVX2 CPU, masks unchanged; docs/benchmarks.md), placed by
    :func:`prepare_model`; on the exact fp32 path (no autocast, the default memory format)
    ``model`` itself in eval mode, so that path stays bit for bit what it was."""
    device = next(model.parameters()).device
    if autocast_dtype(device, compute) is None and not channels_last(device, compute):
        return model.eval()
    return prepare_model(fold_batch_norm(model), device, compute)


def forward_fn(model: SegmentationModel, compute: ComputeConfig | None = None) -> Forward:
    """``model.forward_with_latent``, through ``torch.compile`` when ``compute.compile`` is on.

    The compiled function lives as long as the caller's loop; the model is not changed.
    """
    if compute is not None and compute.compile:
        return torch.compile(model.forward_with_latent)
    return model.forward_with_latent


def describe(device: torch.device, compute: ComputeConfig | None = None) -> dict[str, str]:
    """How this process computes on ``device`` under ``compute``: what every result records
    beside its scores, because ``auto`` resolves per machine (bf16 on one node, fp32 on the
    next) and the two paths round differently — a cell is reproducible bit for bit on the
    same kind of processor, and within rounding (docs/results.md, "Issue 14") across kinds.

    Keys: ``precision`` (``bf16`` autocast or ``fp32``), ``channels_last`` (``on``/``off``;
    inference folds batch norm whenever either is not the exact path), ``device`` (``cpu``
    or the CUDA device's name), ``cpu_capability`` (torch's CPU kernel level: ``AVX512``,
    ``AVX2``, …), ``native_bf16`` (``yes``/``no``), ``torch`` (its version)."""
    return {
        "precision": "bf16" if autocast_dtype(device, compute) is torch.bfloat16 else "fp32",
        "channels_last": "on" if channels_last(device, compute) else "off",
        **machine(device),
    }


def machine(device: torch.device | None = None) -> dict[str, str]:
    """The hardware side of :func:`describe` (``device``, ``cpu_capability``, ``native_bf16``,
    ``torch``) for ``device`` (default: :func:`default_device`); every checkpoint records it as
    ``machine``, so that with the configuration it records, the path that made it is known."""
    device = device or default_device()
    return {
        "device": _device_name(device),
        "cpu_capability": _cpu_capability(),
        "native_bf16": "yes" if _native_bf16(device) else "no",
        "torch": torch.__version__,
    }


def describe_label(record: dict[str, str]) -> str:
    """One line for a :func:`describe` record: ``bf16 + channels_last on cpu (AVX512)``."""
    if not record:
        return "unrecorded"
    memory = " + channels_last" if record.get("channels_last") == "on" else ""
    return f"{record.get('precision', '?')}{memory} on {record.get('device', '?')} ({record.get('cpu_capability', '?')})"


def compute_tags(record: dict[str, str]) -> dict[str, str]:
    """A :func:`describe` record as MLflow tags (``fsmeta.compute.precision``, …): how a benchmark
    cell's or a Tune trial's run computed, to filter and compare runs by in the MLflow UI."""
    return {f"fsmeta.compute.{k}": str(v) for k, v in record.items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except (AssertionError, RuntimeError):  # no CUDA in this build or no device behind the name
            return str(device)
    return device.type


@functools.cache
def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # a torch without the probe
        return "unknown"


def host_buffer(shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised host tensor to assemble a batch in: page-locked when it is bound for CUDA,
    so :func:`to_device` copies it without an extra staging copy and without blocking."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=device.type == "cuda" and torch.cuda.is_available())


def to_device(t: torch.Tensor, device: torch.device, memory_channels_last: bool = False) -> torch.Tensor:
    """``t`` on ``device``: host → CUDA through pinned memory with a non-blocking copy; unchanged on the CPU.

    The caching host allocator keeps a pinned block alive until its copy has run, so
    the caller may drop or reuse its reference at once.
    """
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
    elif t.device != device:
        t = t.to(device)
    if memory_channels_last and t.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def host_values(values: Sequence[torch.Tensor]) -> list[float]:
    """Scalar tensors (e.g. the losses of an epoch) as Python floats, in one device → host transfer.

    Each float is exactly ``float(tensor)``: the same numbers as reading them one by one.
    """
    if not values:
        return []
    return torch.stack([v.detach().reshape(()) for v in values]).cpu().tolist()


__all__ = [
    "ComputeConfig", "autocast", "autocast_dtype", "channels_last", "compute_tags", "cpu_has_native_bf16", "default_device", "describe",
    "describe_label", "forward_fn", "host_buffer", "host_values", "inference_model", "machine", "prepare_model", "to_device",
]
