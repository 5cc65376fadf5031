"""A study's unit of work, the cell: fine-tune pre-trained weights on a seeded K-shot
support set of the target and evaluate on its held-out images; and the demo's
configuration. The grid of cells is run by :mod:`fsmeta.benchmark`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch

from fsmeta.atomic import atomic_write_bytes
from fsmeta.checkpoint import model_from_checkpoint
from fsmeta.config import Config, load_config
from fsmeta.data.crops import CropIndex
from fsmeta.data.io import support_crop_index
from fsmeta.data.sampling import draw_support, protocol_split, held_out_images
from fsmeta.data.store import ImageSet
from fsmeta.errors import DataError, FsmetaError
from fsmeta.evaluate import default_device, evaluate
from fsmeta.finetune import HeldOut, finetune, hold_out, hold_out_patches, pool_share_curve, support_crops
from fsmeta.losses import prior_threshold
from fsmeta.metrics import median_object_area
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
    # the demo fine-tunes as the paper does (20 epochs of its 64² crops), which keeps it to
    # about a minute and a half; real3.yaml and `fsmeta finetune` use the measured defaults
    "finetune.epochs=20",
    "finetune.steps=0",
    "finetune.batch_size=64",
    "finetune.lr=1e-4",
    "finetune.crop_size=0",
    "finetune.holdout=0",
    "augment.finetune=false",
    "eval.threshold_rule=fixed",
    "eval.min_size_fraction=0",
    "eval.tta=false",
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


def target_config(cfg: Config, target: str, arch: str, pretraining: str | None = None) -> Config:
    """The configuration of one (target, arch, pre-training): the target left out of the sources.

    With ``study.datasets``, the sources are those data sets less the target; a target not among
    them (e.g. a lab's own data set, imported, scored under a study's configuration such as
    ``configs/real3.yaml`` with ``--set "study.targets=[mylab]"``) learns from all of them.
    Whether every name is a known data set is checked by :func:`fsmeta.data.registry.resolve_sources`
    and :func:`~fsmeta.data.registry.load_dataset` before a study starts."""
    data = dataclasses.replace(cfg.data, target=target)
    if cfg.study.datasets:
        data = dataclasses.replace(data, sources=[d for d in cfg.study.datasets if d != target])
    elif target in cfg.data.sources:
        data = dataclasses.replace(data, sources=[d for d in cfg.data.sources if d != target])
    meta = cfg.meta
    if pretraining and pretraining.startswith("meta-"):
        meta = dataclasses.replace(meta, variant=pretraining[len("meta-"):])
    return dataclasses.replace(cfg, data=data, arch=arch, meta=meta)


def decision_threshold(cfg: Config, support_masks: torch.Tensor, holdout: HeldOut | None = None) -> float:
    """The threshold a model fine-tuned on ``support_masks`` is scored at: the one its held-out
    bands chose (``finetune.holdout``), else ``eval.threshold_rule``'s; it reads only the
    support set's annotation, never a test image."""
    if holdout is not None and holdout.curve:
        return float(holdout.threshold)
    if cfg.eval.threshold_rule == "prior":
        return prior_threshold(support_masks)
    return float(cfg.eval.threshold)


def min_object_size(cfg: Config, masks: Iterable[np.ndarray]) -> int:
    """The smallest predicted object a model fine-tuned on ``masks`` keeps (pixels):
    ``eval.min_size_fraction`` of the median area of their annotated objects, rounded; 0 keeps
    all. It reads only the support set's annotation, never a test image."""
    if cfg.eval.min_size_fraction <= 0:
        return 0
    return int(round(cfg.eval.min_size_fraction * median_object_area(masks)))


def decision_rule(cfg: Config, model: SegmentationModel, support_y: torch.Tensor, holdout: HeldOut | None,
                  masks: Iterable[np.ndarray], pool: Sequence[np.ndarray] = (), progress: bool = False) -> tuple[float, int]:
    """(threshold, smallest kept object in pixels) a model just fine-tuned on a support set is
    scored at, by the benchmark's cells, Tune trials and ``fsmeta finetune`` alike: see
    :func:`decision_threshold` and :func:`min_object_size` (``masks``: the support's annotated
    windows). With held-out bands and ``eval.tta``, the bands' threshold is chosen again at the
    kept weights on the predictor the evaluation uses, the mean over the 8 flips and turns
    (:meth:`HeldOut.calibrate`): averaging pulls probabilities away from 0 and 1, so a threshold
    chosen on the plain prediction (0.9–0.95 on some cells) cuts objects out of the averaged one.
    The smallest-object rule is not part of that choice: on the bands it made the IoU curve jump
    object by object and the choice noisier (docs/results.md, issue 19). With ``eval.pool_threshold``
    and held-out bands, the bands' threshold then moves toward the one at which the unannotated
    images ``pool`` get the support's foreground share (:meth:`HeldOut.match_pool`), predicted as the
    evaluation predicts (without such images, the bands' threshold alone). Reads only the support's
    annotation, never a test image."""
    masks = list(masks)
    min_size = min_object_size(cfg, masks)
    if holdout is not None and holdout.curve and cfg.eval.tta:
        holdout.calibrate(model, cfg.compute, tta=True)
    if cfg.eval.pool_threshold and holdout is not None and holdout.curve and len(pool):
        from fsmeta.compute import inference_model
        from fsmeta.models import DihedralTTA

        scorer = inference_model(model, cfg.compute)
        curve = pool_share_curve(DihedralTTA(scorer) if cfg.eval.tta else scorer, pool, cfg.compute, progress)
        model.train()
        holdout.match_pool(mask_composition(masks)["support_foreground"], curve)
    return decision_threshold(cfg, support_y, holdout), min_size


def unannotated_draw(pool: np.ndarray, support: Iterable[int], n: int, seed: int) -> np.ndarray:
    """``n`` images of ``pool`` outside ``support``, drawn by ``seed`` (fewer when the pool has
    fewer): the unannotated images ``eval.pool_threshold`` reads, never a test image."""
    rest = np.setdiff1d(np.asarray(pool), np.asarray(list(support), dtype=np.int64))
    return np.random.default_rng([seed, 104729]).permutation(rest)[:n]


def unannotated_images(cfg: Config, target: ImageSet, pool: np.ndarray, test: np.ndarray | None, support: Iterable[int],
                       seed: int, where: str) -> list[np.ndarray]:
    """The images :func:`unannotated_draw` gives ``eval.pool_threshold`` for a support drawn from
    ``pool`` beside the fixed ``test`` images: none when the option is off, when there are no
    held-out bands whose threshold they would move, or with ``test`` None (the 2020 protocol), where
    every image outside the support is a test image and none is left unannotated to read."""
    if not cfg.eval.pool_threshold or cfg.finetune.holdout <= 0:
        return []
    if test is None:
        log.debug("%s: eval.pool_threshold reads nothing in the 2020 protocol (every other image is a test image)", where)
        return []
    return [target.image(int(i)) for i in unannotated_draw(pool, support, cfg.eval.pool_images, seed)]


def support_masks(target: ImageSet, windows: Iterable[tuple[int, int, int, int, int]]) -> list[np.ndarray]:
    """The annotated windows ``(image, y, x, height, width)`` of a support set, as masks."""
    return [target.masks[i][y:y + h, x:x + w] for i, y, x, h, w in windows]


def cell_split(cfg: Config, n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(pool, fixed test) of a cell: in the 2023 protocol each seed is its own split
    (the paper's 10 splits) unless ``eval.vary_split`` is off; in 2020 the seed only
    changes the K-shot draw."""
    split_seed = cfg.eval.split_seed + (seed if cfg.eval.protocol == "2023" and cfg.eval.vary_split else 0)
    return protocol_split(n_images, cfg.eval.protocol, cfg.eval.test_fraction, split_seed)


class Support(NamedTuple):
    """A fine-tuning support set: its crops, the images they come from, the annotated pixels,
    the held-out bands or patches (None when ``finetune.holdout`` is 0 or none can be held out),
    the annotated windows ``(image, y, x, height, width)`` and the seconds its selection took."""

    x: torch.Tensor
    y: torch.Tensor
    images: np.ndarray
    pixels: int
    holdout: HeldOut | None
    windows: tuple[tuple[int, int, int, int, int], ...] = ()
    seconds: float = 0.0


def annotation_composition(target: ImageSet, windows: Iterable[tuple[int, int, int, int, int]]) -> dict[str, float]:
    """What an annotated support holds, read from its true masks once it is chosen (a report, never
    an input to choosing): ``support_foreground``, the foreground share of its annotated pixels, and
    ``support_empty``, the share of its windows (images or patches) with no foreground at all."""
    return mask_composition(support_masks(target, windows))


def mask_composition(masks: Iterable[np.ndarray]) -> dict[str, float]:
    """:func:`annotation_composition` of the annotated masks themselves."""
    fg = total = empty = n = 0
    for mask in masks:
        count = int(np.count_nonzero(mask))
        fg, total, empty, n = fg + count, total + mask.size, empty + (count == 0), n + 1
    return {"support_foreground": fg / total if total else 0.0, "support_empty": empty / n if n else 0.0}


def support_holdout(cfg: Config, images: ImageSet, index: CropIndex, seed: int) -> HeldOut | None:
    """The held-out bands of a whole-image support set's crops (``finetune.holdout``), or None
    (a patch support holds out whole patches instead: :func:`fsmeta.finetune.hold_out_patches`)."""
    if cfg.finetune.holdout <= 0:
        return None
    return hold_out(images, index, cfg.finetune.holdout, seed)


def random_support(cfg: Config, target: ImageSet, pool: np.ndarray, cell: Cell) -> Support:
    """The 2020 protocol: K images drawn by the seed, all their crops at the fine-tune stride."""
    support = draw_support(pool, cell.shots, cell.seed, target=cell.target)
    try:
        index, note = support_crop_index(target, **cfg.finetune_grid(cell.target), subset=support)
    except DataError as exc:
        ids = ", ".join(target.ids[i] for i in support)
        raise DataError(f"{cell.name()}: support images [{ids}] give no crops: {exc}") from None
    if note:
        log.info("%s: %s", cell.name(), note)
    x, y = support_crops(target, index)
    windows = tuple((int(i), 0, 0, *target.masks[i].shape[:2]) for i in support)
    return Support(x, y, support, sum(int(target.masks[i].size) for i in support), support_holdout(cfg, target, index, cell.seed),
                   windows)


def _ranking_file(cfg: Config, checkpoint: Path, cell: Cell, legacy_method: str | None = None) -> Path:
    """Where the ranking of a (checkpoint, method, unit, split seed) is kept. The name hashes
    everything a ranking depends on: the checkpoint's bytes, select.* (less ``select.method``, the
    user command's default: the cell's own method is in the name), the crop grid and the split
    (and, for a method whose choice depends on the budget — typiclust — the budget). ``legacy_method``: the name a ranking written before
    commit 1c81805 has, whose key held that run's select.method (bench/selection_table.py reads them)."""
    from fsmeta.select import patch_budget
    from fsmeta.select.selection import BUDGETED_METHODS

    digest = hashlib.sha256(checkpoint.read_bytes())
    select = {k: v for k, v in dataclasses.asdict(cfg.select).items() if k != "method"}  # the cell names its method
    if legacy_method is not None:
        select = {**dataclasses.asdict(cfg.select), "method": legacy_method}
    key = {"select": select, "crop": cfg.finetune_crop_size(), "stride": cfg.data.stride(cell.target, "finetune"),
           "split": [cfg.eval.protocol, cfg.eval.test_fraction, cfg.eval.split_seed], "target": cell.target}
    if cell.selection in BUDGETED_METHODS:  # a set chosen for its budget: one ranking per budget
        key["budget"] = patch_budget(cell.target, cell.shots, cfg) if cfg.select.unit == "patch" else cell.shots
    digest.update(json.dumps(key, sort_keys=True, default=str).encode())
    return checkpoint.parent / "rankings" / f"{cell.selection}-{cfg.select.unit}-s{cell.seed}-{digest.hexdigest()[:16]}.json"


def _selected_support(cfg: Config, target: ImageSet, model: SegmentationModel, pool: np.ndarray,
                      test: np.ndarray, cell: Cell, checkpoint: Path | None = None) -> Support:
    """The 2023 protocol: the selection method picks a budget of patches (patches-per-shot × K)
    or K whole images from the pool; their true masks are the annotation.

    A score ranking does not depend on the budget, so with ``checkpoint`` given it is computed once
    per (checkpoint, method, unit, split) and kept beside the checkpoint: the cells K = 1…10
    of one split share it (MC-dropout's ten passes over the pool would otherwise run per K);
    a method whose set depends on the budget (``typiclust``) keeps one per budget."""
    from fsmeta.select import patch_budget, select_support, selection_crops, selection_index
    from fsmeta.select.selection import Item, Selection

    unit = cfg.select.unit
    budget = patch_budget(cell.target, cell.shots, cfg) if unit == "patch" else cell.shots
    cache = _ranking_file(cfg, checkpoint, cell) if checkpoint is not None else None
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        ranking = tuple(Item(*row) for row in saved["ranking"])
        if budget > len(ranking):
            raise FsmetaError(f"{cell.name()}: a budget of {budget} {unit}(s) is larger than the {len(ranking)} candidates of the pool")
        selection = Selection(cell.selection, unit, int(budget), ranking)
        seconds = float(saved.get("seconds", 0.0))  # what computing it took (0: a ranking file from before this was kept)
    else:
        start = time.perf_counter()
        selection = select_support(model, target, pool, budget, cell.selection, unit, cfg, seed=cell.seed,
                                   run_pretext=False, exclude=test)
        seconds = time.perf_counter() - start
        if cache is not None:
            rows = [[it.image, it.y, it.x, it.height, it.width, it.score] for it in selection.ranking]
            atomic_write_bytes(cache, json.dumps({"method": cell.selection, "unit": unit, "seed": cell.seed, "seconds": seconds,
                                                  "ranking": rows}).encode())
    if np.intersect1d(selection.image_indices(), test).size:
        raise FsmetaError(f"{cell.name()}: the selection holds a test image")  # a stale or foreign ranking file
    windows = tuple((it.image, it.y, it.x, it.height, it.width) for it in selection.selected)
    if unit == "image":
        index = selection_index(target, selection, cfg)
        x, y = support_crops(target, index)
        holdout = support_holdout(cfg, target, index, cell.seed)
    else:
        x, y = selection_crops(target, selection, cfg)  # row r is patch r
        holdout = hold_out_patches(target, list(windows), cfg.finetune.holdout, cell.seed) if cfg.finetune.holdout > 0 else None
    return Support(x, y, np.asarray(selection.image_indices()), int(selection.annotated_pixels()), holdout, windows, seconds)


def run_cell(cfg: Config, target: ImageSet, checkpoint: Path, cell: Cell,
             cache_rankings: bool = False) -> tuple[dict[str, Any], SegmentationModel, np.ndarray]:
    """Fine-tune the checkpoint on the cell's support set and evaluate on its test images.

    2020 protocol: a seeded K-image draw, tested on every other image. 2023
    protocol: ``cell.selection`` chooses the support from the pool of the seed's
    split (``checkpoint`` is then the pretext-trained θ′ that scores and is
    fine-tuned), tested on the split's fixed test images; ``cache_rankings`` keeps each
    split's ranking beside the checkpoint for the other budgets.

    Returns the metrics, the fine-tuned model and the indices of the test images.
    """
    pool, fixed_test = cell_split(cfg, len(target), cell.seed)
    model, _ = model_from_checkpoint(checkpoint)
    model.to(default_device())
    if fixed_test is None:
        if cell.selection != "random":
            raise FsmetaError(f"{cell.name()}: selection {cell.selection!r} needs eval.protocol=2023 (a fixed test split)")
        chosen = random_support(cfg, target, pool, cell)
        test = held_out_images(len(target), pool, fixed_test, chosen.images)
    else:
        chosen = _selected_support(cfg, target, model, pool, fixed_test, cell, checkpoint if cache_rankings else None)
        test = fixed_test
    x, y, holdout = chosen.x, chosen.y, chosen.holdout
    finetune(model, x, y, cfg.finetune, seed=cell.seed, where=cell.name(), compute=cfg.compute, augment=cfg.augment,
             holdout=holdout, shots=cell.shots)
    unannotated = unannotated_images(cfg, target, pool, fixed_test, chosen.images, cell.seed, cell.name())
    threshold, min_size = decision_rule(cfg, model, y, holdout, support_masks(target, chosen.windows), unannotated)
    summary, _ = evaluate(model, target, test, threshold, compute=cfg.compute, min_size=min_size, tta=cfg.eval.tta)
    metrics = {
        "miou": summary["miou"], "pooled_iou": summary["pooled_iou"], "f1": summary["f1"],
        "precision": summary["precision"], "recall": summary["recall"], "n_test": int(summary["n_images"]),
        "support_crops": int(len(x)), "crop_size": int(x.shape[-1]), "support_images": int(len(chosen.images)),
        "annotated_pixels": chosen.pixels, "threshold": threshold, "min_size": min_size,
        "finetune_steps": cfg.finetune.budget(cell.shots),
        **annotation_composition(target, chosen.windows), "ranking_seconds": chosen.seconds,
        **(holdout.summary() if holdout is not None else {}),
    }
    return metrics, model, test
