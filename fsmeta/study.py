"""Studies: fine-tune and evaluate every (pre-training, K, seed) cell of a target, and
write the results table, its summary and the mIoU-vs-K plot. ``fsmeta demo`` is
the smallest such study; the benchmark grid builds on the same cells.
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
from fsmeta.data.registry import load_dataset, resolve_sources
from fsmeta.data.sampling import draw_support, protocol_split, held_out_images
from fsmeta.data.store import ImageSet
from fsmeta.errors import DataError, FsmetaError
from fsmeta.evaluate import evaluate
from fsmeta.finetune import finetune, support_crops
from fsmeta.models import SegmentationModel
from fsmeta.progress import Progress
from fsmeta.report import plot_miou_vs_shots, write_results
from fsmeta.tracking import Tracker
from fsmeta.train import apply_threads, meta_train, scratch_checkpoint, transfer_train

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
    finetune(model, x, y, cfg.finetune, seed=cell.seed, where=cell.name())
    test = held_out_images(len(target), pool, fixed_test, support)
    summary, _ = evaluate(model, target, test, cfg.eval.threshold)
    metrics = {
        "miou": summary["miou"], "pooled_iou": summary["pooled_iou"], "f1": summary["f1"],
        "precision": summary["precision"], "recall": summary["recall"], "n_test": int(summary["n_images"]),
        "support_crops": int(len(x)),
    }
    return metrics, model, test


def run_grid(
    cfg: Config,
    checkpoints: dict[str, Path],
    tracker: Tracker,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every (pre-training, K, seed) cell of the configured target; one MLflow child run per cell."""
    target = load_dataset(cfg.data.target, cfg)
    pool, _ = protocol_split(len(target), cfg.eval.protocol, cfg.eval.test_fraction, cfg.eval.split_seed)
    too_many = [k for k in cfg.eval.shots if k > len(pool)]
    if too_many:
        raise FsmetaError(f"K={max(too_many)} is larger than the pool of {len(pool)} image(s) of target {cfg.data.target}")
    cells = [Cell(cfg.data.target, cfg.arch, name, "random", k, s)
             for name in checkpoints for k in cfg.eval.shots for s in cfg.eval.seeds]
    bar = Progress(len(cells), f"fine-tune + evaluate {cfg.data.target}", every=0.0, enabled=progress)
    rows = []
    for cell in cells:
        with tracker.run(cell.name(), params=cell.params(), parent_run_id=parent_run_id,
                         tags={"fsmeta.kind": "cell"}) as run_id:
            metrics, _, _ = run_cell(cfg, target, checkpoints[cell.pretraining], cell)
            tracker.log_metrics(run_id, {"iou": metrics["miou"], **{k: v for k, v in metrics.items()}})
        rows.append({**cell.params(), **{k: metrics[k] for k in ("miou", "pooled_iou", "f1", "n_test")}, "run_id": run_id})
        bar.update(detail=f"{cell.pretraining} K={cell.shots} seed={cell.seed}: mIoU {metrics['miou']:.3f}")
    return rows


def run_demo(cfg: Config, out_dir: str | Path, tracker: Tracker, progress: bool = True) -> list[dict[str, Any]]:
    """Leave one synthetic domain out; meta-train, transfer-train, fine-tune and evaluate everything."""
    apply_threads(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = resolve_sources(cfg)
    log.info("demo: target %s, sources %s", cfg.data.target, ", ".join(sources))
    with tracker.run("demo", params={**cfg.flat(), "sources": ",".join(sources)}, tags={"fsmeta.kind": "study"}) as parent:
        checkpoints = {
            f"meta-{cfg.meta.variant}": meta_train(cfg, out / "pretrained", tracker, parent_run_id=parent, progress=progress),
            "transfer": transfer_train(cfg, out / "pretrained", tracker, parent_run_id=parent, progress=progress),
            "scratch": scratch_checkpoint(cfg, out / "pretrained"),
        }
        rows = run_grid(cfg, checkpoints, tracker, parent_run_id=parent, progress=progress)
        csv_path, pq_path = write_results(rows, out)
        plot = plot_miou_vs_shots(rows, out / "miou_vs_shots.png", title=f"{cfg.arch}, target {cfg.data.target}")
        for path in (csv_path, pq_path, plot):
            tracker.log_artifact(parent, path)
    return rows
