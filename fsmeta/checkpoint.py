"""Checkpoints: weights as safetensors, with a small JSON description inside the file
(and a copy beside it for people). Nothing is unpickled, so a checkpoint from
anywhere is safe to load; writes go to a temporary name and are renamed into place.

Every description is built here: :func:`describe_pretraining` for the three
pre-trainings (non-affine batch norm) and :func:`describe_adapted` for a model
adapted from one of them (the pretext θ′, a fine-tuned model; affine batch norm).
Both name the :class:`Kind` and the ``pretraining`` the weights descend from
(``meta-all``, ``transfer``, ``scratch``), whoever wrote them.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fsmeta import __version__
from fsmeta.atomic import atomic_write, atomic_write_bytes
from fsmeta.compute import machine
from fsmeta.config import Config
from fsmeta.errors import FsmetaError
from fsmeta.models import SegmentationModel, build_model

META_KEY = "fsmeta"


class Kind(str, enum.Enum):
    """What a checkpoint holds; the value is what its description's ``kind`` says."""

    META = "meta"  # Reptile meta-training (fsmeta.train.meta_train)
    TRANSFER = "transfer"  # the transfer-learning baseline
    SCRATCH = "scratch"  # the seeded random initialisation (the lower bound)
    PRETEXT = "pretext"  # θ′: a pre-training adapted to a target's pseudo-labels (2023 method)
    FINETUNED = "finetuned"  # fine-tuned on annotated target images


PRETRAININGS = (Kind.META, Kind.TRANSFER, Kind.SCRATCH)


def pretraining_name(meta: dict[str, Any]) -> str:
    """The pre-training a checkpoint descends from, as results tables name it: ``meta-<variant>``,
    ``transfer`` or ``scratch`` (``meta`` when a meta checkpoint records no variant)."""
    if meta.get("pretraining"):
        return str(meta["pretraining"])
    kind = str(meta.get("kind", ""))
    variant = (meta.get("config") or {}).get("meta", {}).get("variant") if isinstance(meta.get("config"), dict) else None
    return f"meta-{variant}" if kind == Kind.META.value and variant else kind


def describe_pretraining(kind: Kind, cfg: Config, sources: list[str], **extra: Any) -> dict[str, Any]:
    """The description of a pre-training of ``cfg`` (architecture, target, sources, whole configuration)."""
    if kind not in PRETRAININGS:
        raise ValueError(f"{kind} is not a pre-training")
    meta = {"arch": cfg.arch, "bn_affine": False, "kind": kind.value, "target": cfg.data.target,
            "sources": sources, "config": cfg.to_dict(), **extra}
    meta["pretraining"] = pretraining_name(meta)
    return meta


def describe_adapted(kind: Kind, base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The description of weights adapted from a checkpoint described by ``base``: its fields,
    then affine batch norm, ``kind``, the pre-training it descends from, and ``fields``."""
    if kind not in (Kind.PRETEXT, Kind.FINETUNED):
        raise ValueError(f"{kind} is not an adapted kind")
    kept = {k: v for k, v in base.items() if k != "fsmeta_version"}
    return {**kept, "bn_affine": True, "kind": kind.value, "pretraining": pretraining_name(base),
            "base_kind": str(base.get("kind", "")), **fields}


def check_fine_tunable(meta: dict[str, Any], path: str | Path) -> None:
    """Fine-tuning starts from a pre-training or from the pretext θ′ of ``fsmeta select``, never
    from a model fine-tuned already."""
    if meta.get("kind") == Kind.FINETUNED.value or (meta.get("bn_affine") and meta.get("kind") != Kind.PRETEXT.value):
        raise FsmetaError(f"{path} is already fine-tuned; fine-tune from a pre-trained checkpoint "
                          "(or the pretext.safetensors of `fsmeta select`)")


# No weight or batch-norm statistic of a trained FCRN or U-Net comes near this (they are
# O(1) and weight decay keeps them there); meta.inner_lr=1e9 gave finite weights of 1e22.
MAX_ABS_VALUE = 1e8


def validate_state(state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse weights or batch-norm statistics that are NaN, infinite or beyond
    :data:`MAX_ABS_VALUE`, naming the first such key.

    A diverged training (too large a learning rate) can end with a finite loss and
    an infinite running variance, or with finite weights of 1e22; such a model
    predicts nothing, so it is never saved and never used.
    """
    for key, value in state.items():
        if not torch.is_floating_point(value) or value.numel() == 0:
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            raise FsmetaError(f"{where}: {key} holds {int((~finite).sum())} NaN or infinite value(s) of {value.numel()}; "
                              "the training diverged (lower the learning rate); refusing these weights")
        largest = float(value.detach().abs().max())
        if largest > MAX_ABS_VALUE:
            raise FsmetaError(f"{where}: {key} holds values up to {largest:.3g}, beyond the {MAX_ABS_VALUE:.0e} any trained "
                              "model stays within; the training diverged (lower the learning rate); refusing these weights")


def _parse_meta(raw: str, path: Path) -> dict[str, Any]:
    """The checkpoint's JSON description, checked for what loading it needs."""
    from fsmeta.models import ARCHITECTURES

    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FsmetaError(f"{path}: its fsmeta metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise FsmetaError(f"{path}: its fsmeta metadata is a {type(meta).__name__}, not a JSON object")
    for key in ("arch", "bn_affine"):
        if key not in meta:
            raise FsmetaError(f"{path}: its fsmeta metadata lacks {key!r}")
    if meta["arch"] not in ARCHITECTURES:
        raise FsmetaError(f"{path}: metadata arch={meta['arch']!r} is not one of {', '.join(ARCHITECTURES)}")
    if not isinstance(meta["bn_affine"], bool):
        raise FsmetaError(f"{path}: metadata bn_affine={meta['bn_affine']!r} is not true or false")
    return meta


def resume_point(meta: dict[str, Any], iterations: int, path: str | Path) -> int:
    """The iteration a meta-training checkpoint resumes at; refuses one past ``meta.iterations``.

    Resuming with fewer iterations than the checkpoint has done would write a final
    model labelled with the smaller count that holds the larger one.
    """
    done = meta.get("iteration")
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise FsmetaError(f"{path}: metadata iteration={done!r} is not a non-negative whole number")
    if done > iterations:
        raise FsmetaError(f"cannot resume {path}: it has done {done} iterations but meta.iterations={iterations}; "
                          f"set meta.iterations to {done} or more, or start anew without --resume")
    return done


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``state`` and ``meta`` (JSON-serialisable; must name ``arch`` and ``bn_affine``) atomically."""
    path = Path(path)
    for key in ("arch", "bn_affine"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    validate_state(state, path)
    meta = {**meta, "fsmeta_version": __version__, "machine": machine()}
    text = json.dumps(meta, sort_keys=True, default=str)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: text}))
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n").encode())
    return path


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FsmetaError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise FsmetaError(f"{path} is not a readable safetensors checkpoint: {exc}") from None
    if raw is None:
        raise FsmetaError(f"{path} is a safetensors file without fsmeta metadata (arch, batch-norm mode)")
    return _parse_meta(raw, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a checkpoint written by :func:`save_checkpoint`."""
    meta = read_checkpoint_meta(path)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FsmetaError(f"{path} is not a readable safetensors checkpoint: {exc}") from None
    return state, meta


def model_from_checkpoint(path: str | Path, *, dropout: float = 0.0) -> tuple[SegmentationModel, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (strictly)."""
    state, meta = load_checkpoint(path)
    validate_state(state, path)
    model = build_model(meta["arch"], affine=bool(meta["bn_affine"]), dropout=dropout)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FsmetaError(f"{path} does not fit architecture {meta['arch']}: {exc}") from None
    return model, meta
