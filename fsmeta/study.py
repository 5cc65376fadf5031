"""A study's unit of work, the cell: fine-tune pre-trained weights on a seeded K-shot
support set of the target and evaluate on its held-out images; and the demo's
configuration. The grid of cells is run by :mod:`fsmeta.benchmark`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsmeta.checkpoint import model_from_checkpoint
from fsmeta.config import Config, load_config
from fsmeta.data.crops import build_crop_index
from fsmeta.data.sampling import draw_support, protocol_split, held_out_images
from fsmeta.data.store import ImageSet
from fsmeta.errors import DataError
from fsmeta.evaluate import default_device, evaluate
from fsmeta.finetune import finetune, support_crops
from fsmeta.models import SegmentationModel

log = logging.getLogger(__name__)

# The demo's reduced scale, also written out as configs/demo.yaml (a test keeps the two equal).
# min_foreground scales the paper's 360 pixels of a 256×256 crop to a 64×64 crop: 360 / 16 ≈ 22.
DEMO_OVERRIDES = [
    "threads=2",
    "data.target=synth-he",
    "data.crop_size=64",
    "data.min_foreground=22",
    "data.source_stride={default: 32}",
    "data.finetune_stride={default: 32}",
    "data.synth.images=40",
    "data.synth.size=128",
    "meta.variant=all",
    "meta.iterations=40",
    "meta.inner_steps=5",
    "meta.checkpoint_every=10",
    "transfer.steps=60",
    "eval.shots=[1, 3, 5]",
    "eval.seeds=[0, 1, 2]",
]


def demo_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The demo's configuration: its reduced-scale defaults, then a file, then overrides."""
    if path is None:
        return load_config(None, [*DEMO_OVERRIDES, *overrides])
    return load_config(path, overrides)


@dataclass(frozen=True)
class Cell:
    target: str
    arch: str
    pretraining: str
    selection: str
    shots: int
    seed: int

    def name(self) -> str:
        return f"{self.target}/{self.arch}/{self.pretraining}/{self.selection}/K{self.shots}/s{self.seed}"

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("target", "arch", "pretraining", "selection", "shots", "seed")}


def run_cell(cfg: Config, target: ImageSet, checkpoint: Path, cell: Cell) -> tuple[dict[str, Any], SegmentationModel, np.ndarray]:
    """Fine-tune the checkpoint on the cell's K-shot support set and evaluate on its test images.

    Returns the metrics, the fine-tuned model and the indices of the test images.
    """
    pool, fixed_test = protocol_split(len(target), cfg.eval.protocol, cfg.eval.test_fraction, cfg.eval.split_seed)
    support = draw_support(pool, cell.shots, cell.seed, target=cell.target)
    try:
        index = build_crop_index(target, cfg.data.crop_size, cfg.data.stride(cell.target, "finetune"),
                                 cfg.data.min_foreground, subset=support)
    except DataError as exc:
        ids = ", ".join(target.ids[i] for i in support)
        raise DataError(f"{cell.name()}: support images [{ids}] give no crops: {exc}") from None
    x, y = support_crops(target, index)
    model, _ = model_from_checkpoint(checkpoint)
    model.to(default_device())
    finetune(model, x, y, cfg.finetune, seed=cell.seed, where=cell.name())
    test = held_out_images(len(target), pool, fixed_test, support)
    summary, _ = evaluate(model, target, test, cfg.eval.threshold)
    metrics = {
        "miou": summary["miou"], "pooled_iou": summary["pooled_iou"], "f1": summary["f1"],
        "precision": summary["precision"], "recall": summary["recall"], "n_test": int(summary["n_images"]),
        "support_crops": int(len(x)),
    }
    return metrics, model, test
