"""Checkpoints: weights as safetensors, with a small JSON description inside the file
(and a copy beside it for people). Nothing is unpickled, so a checkpoint from
anywhere is safe to load; writes go to a temporary name and are renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fsmeta import __version__
from fsmeta.atomic import atomic_write, atomic_write_bytes
from fsmeta.errors import FsmetaError
from fsmeta.models import SegmentationModel, build_model

META_KEY = "fsmeta"


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``state`` and ``meta`` (JSON-serialisable; must name ``arch`` and ``bn_affine``) atomically."""
    path = Path(path)
    for key in ("arch", "bn_affine"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    meta = {**meta, "fsmeta_version": __version__}
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
    return json.loads(raw)


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
    model = build_model(meta["arch"], affine=bool(meta["bn_affine"]), dropout=dropout)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FsmetaError(f"{path} does not fit architecture {meta['arch']}: {exc}") from None
    return model, meta
