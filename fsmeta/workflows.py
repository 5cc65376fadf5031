"""A user's single-model commands as library functions: ``fsmeta finetune`` and ``fsmeta evaluate``.

The CLI parses arguments and prints; ``jobs/``, tests and notebooks call these
functions and get the same behaviour. Studies (many models) live in
:mod:`fsmeta.benchmark` and :mod:`fsmeta.tuning`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsmeta.checkpoint import Kind, check_fine_tunable, describe_adapted, model_from_checkpoint, pretraining_name, save_checkpoint
from fsmeta.compute import default_device, prepare_model
from fsmeta.config import Config
from fsmeta.data.io import load_folder, support_crop_index
from fsmeta.data.registry import load_dataset
from fsmeta.data.sampling import draw_support, held_out_images
from fsmeta.data.store import ImageSet
from fsmeta.errors import FsmetaError
from fsmeta.evaluate import evaluate
from fsmeta.finetune import POOL_AGREEMENT, THRESHOLD_RANGE, finetune, support_crops
from fsmeta.models import clone_state
from fsmeta.study import Cell, cell_split, decision_rule, random_support, support_holdout, unannotated_images
from fsmeta.study import support_masks as window_masks
from fsmeta.tracking import Tracker


@dataclass
class FinetuneResult:
    """What :func:`finetune_checkpoint` wrote and trained on."""

    path: Path  # the fine-tuned checkpoint
    target: str  # the target's name, or ``folder:<path>`` for a user's folders
    images: int  # annotated images fine-tuned on
    crops: int  # training crops cut from them
    crop_size: int
    final_loss: float  # mean loss of the last epoch
    note: str = ""  # something the user should know (e.g. a crop shrunk to small images)
    registered: str = ""  # models:/NAME/VERSION when registered in MLflow's model registry


def cell_images(cfg: Config, shots: int, seed: int) -> tuple[ImageSet, np.ndarray, np.ndarray]:
    """(target, support, test) of the seeded K-shot draw of ``cfg.data.target``, as the benchmark
    draws it: the support images and the held-out images that are scored."""
    target = load_dataset(cfg.data.target, cfg)
    pool, fixed_test = cell_split(cfg, len(target), seed)
    support = draw_support(pool, shots, seed, target=cfg.data.target)
    return target, support, held_out_images(len(target), pool, fixed_test, support)


def finetune_checkpoint(weights: str | Path, cfg: Config, out: str | Path, tracker: Tracker, *, shots: int = 5,
                        seed: int = 0, support_images: str | Path | None = None,
                        support_masks: str | Path | None = None, progress: bool = True,
                        register: str = "", pool: str | Path | None = None) -> FinetuneResult:
    """Fine-tune a pre-trained checkpoint (or the pretext θ′ of ``fsmeta select``) and save it to ``out``.

    The support set is either a user's annotated folders (``support_images`` with
    ``support_masks``: every image, paired by name) or the seeded ``shots``-image draw
    of the prepared target ``cfg.data.target``. The run is logged to ``tracker``; the
    checkpoint's description names the pre-training, the support images and the run.
    With ``register``, the checkpoint becomes a new version of that registered MLflow model.
    ``pool``, a folder of unannotated images of the same kind, is what ``eval.pool_threshold`` (on
    by default) reads on a folder support (its images that share a support image's name are left
    out; without it the bands' threshold stands alone, and the note says how to give one); on a
    prepared target the option reads its pool outside the draw, as a benchmark cell does.
    """
    if register and not tracker.enabled:
        raise FsmetaError(f"--register {register} needs MLflow tracking; drop --no-tracking")
    if pool and not cfg.eval.pool_threshold:  # a folder of unannotated images turns the option on (and the checkpoint records it)
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, pool_threshold=True))
    ask_for_pool = bool(support_images) and not pool and cfg.eval.pool_threshold and cfg.finetune.holdout > 0
    model, meta = model_from_checkpoint(weights)
    model.to(default_device())  # CUDA when present
    check_fine_tunable(meta, weights)
    if bool(support_images) != bool(support_masks):
        raise FsmetaError("--support-images and --support-masks go together: give both folders")
    if pool and not support_images:
        raise FsmetaError("--pool goes with --support-images: a prepared target's draw reads its own pool (eval.pool_threshold)")
    note = ""
    if support_images:
        folder = Path(support_images).resolve()
        images = load_folder(support_images, support_masks, colour=cfg.data.colour)
        index, note = support_crop_index(images, **cfg.finetune_grid("default"))
        x, y = support_crops(images, index)
        holdout = support_holdout(cfg, images, index, seed)
        target, label, support_ids, crop_size = f"folder:{folder}", folder.name, list(images.ids), index.size
        masks = list(images.masks)
        # a multi-page support file's planes are STEM-pNNN: its file is left out of the pool too
        unannotated = _pool_images(cfg, pool, {*support_ids, *(re.sub(r"-p\d{3}$", "", i) for i in support_ids)}, seed,
                                   images.meta["colour"])
    else:
        # The benchmark's own K-shot cell: the same draw, the same crops.
        images = load_dataset(cfg.data.target, cfg)
        pool_ids, test_ids = cell_split(cfg, len(images), seed)
        cell = Cell(cfg.data.target, meta["arch"], pretraining_name(meta), "random", shots, seed)
        chosen = random_support(cfg, images, pool_ids, cell)
        x, y, holdout = chosen.x, chosen.y, chosen.holdout
        target, label, support_ids, crop_size = cfg.data.target, cfg.data.target, [images.ids[i] for i in chosen.images], int(x.shape[-1])
        masks = window_masks(images, chosen.windows)
        unannotated = unannotated_images(cfg, images, pool_ids, test_ids, chosen.images, seed, cell.name())
    n_images = len(support_ids)
    colour = str(images.meta.get("colour") or "grey")  # the channel the model learns from, and predict feeds it
    if colour != "grey":
        note = "; ".join(filter(None, [note, f"colour: {colour} ({images.meta.get('colour_reason', 'the store records it')})"]))
    params: dict[str, Any] = {"target": target, "colour": colour, "arch": meta["arch"], "pretraining": meta.get("kind", ""), "shots": n_images,
                              "seed": seed, "weights": str(weights), "support_crops": len(x), "crop_size": crop_size,
                              "finetune_steps": cfg.finetune.budget(n_images)}
    with tracker.run(f"finetune/{label}/K{n_images}/s{seed}", params=params, tags={"fsmeta.kind": "finetune"}) as run_id:
        _, history = finetune(model, x, y, cfg.finetune, seed=seed, where=f"fine-tune {label}", compute=cfg.compute,
                              progress=progress, augment=cfg.augment, holdout=holdout, shots=n_images)
        for epoch, loss in enumerate(history, 1):
            tracker.log_metrics(run_id, {"loss": loss}, step=epoch)
        threshold, min_size = decision_rule(cfg, model, y, holdout, masks, unannotated, progress)
        if holdout is not None:
            for step, iou, chosen in holdout.curve:
                tracker.log_metrics(run_id, {"holdout_iou": iou, "holdout_threshold": chosen}, step=step)
            tracker.log_metrics(run_id, holdout.summary())
            note = "; ".join(filter(None, [note, f"held-out bands chose step {holdout.best_step} (IoU {holdout.iou:.3f}) "
                                                 f"and threshold {holdout.threshold:.2f}"
                                                 + ("" if holdout.raw_threshold is None else
                                                    f" (scored as predicted{', with TTA' if cfg.eval.tta else ''}; "
                                                    f"{holdout.raw_threshold:.2f} before)")]))
            if holdout.pool:
                rec = holdout.pool
                edge = rec["pool_match_threshold"] in (THRESHOLD_RANGE[0], THRESHOLD_RANGE[1])  # no threshold matches: the nearest
                note = "; ".join([note, f"{len(unannotated)} unannotated image(s) are predicted the support's foreground share "
                                        f"{'nearest (the end of the grid) ' if edge else ''}at {rec['pool_match_threshold']:.2f}: " + (
                                            f"threshold {holdout.threshold:.2f}, halfway from the bands' {rec['pool_bands_threshold']:.2f}"
                                            if rec["pool_used"] else
                                            f"kept the bands' {rec['pool_bands_threshold']:.2f}, as the pool's share there is "
                                            f"{rec['pool_ratio']:.2g}× the support's (more than {POOL_AGREEMENT:g}× apart)")])
        if ask_for_pool and holdout is not None and holdout.curve:
            note = "; ".join(filter(None, [note, "no --pool folder: the held-out bands' threshold alone (give a folder of "
                                                 "unannotated images of the same kind with --pool DIR to check it against "
                                                 "them, eval.pool_threshold; docs/results.md)"]))
        if unannotated and (holdout is None or not holdout.pool):
            note = "; ".join(filter(None, [note, "--pool was not used: no held-out band could be cut from the support, so "
                                                 "there is no bands' threshold to move"]))
        if min_size:
            note = "; ".join(filter(None, [note, f"objects under {min_size} px dropped ({cfg.eval.min_size_fraction:g} of the "
                                                 "support's median annotated object)"]))
        if cfg.eval.tta:
            note = "; ".join(filter(None, [note, "predictions are the mean over the 8 flips and 90° turns (eval.tta; "
                                                 "`fsmeta predict --no-tta` for the plain one)"]))
        path = save_checkpoint(out, clone_state(model), describe_adapted(
            Kind.FINETUNED, meta, target=target, shots=n_images, seed=seed, support=support_ids, crop_size=crop_size,
            threshold=threshold, min_size=min_size, tta=bool(cfg.eval.tta), colour=colour, config=cfg.to_dict(),
            mlflow_run_id=run_id))
        tracker.log_metrics(run_id, {"threshold": threshold, "min_size": min_size, "tta": float(cfg.eval.tta)})
        registered = f"models:/{register}/{tracker.register_model(run_id, path, register)}" if register else ""
    return FinetuneResult(path, target, n_images, len(x), crop_size, history[-1], note, registered)


def _pool_images(cfg: Config, pool: str | Path | None, support: set[str], seed: int, colour: str = "grey") -> list[np.ndarray]:
    """The unannotated images of the folder ``pool`` that ``eval.pool_threshold`` reads: a draw of
    ``eval.pool_images`` by ``seed`` (as a benchmark cell draws them) among its images not named as
    a support image or named as a mask; only those are read (none without a folder), as the support's
    channel ``colour``."""
    if not pool:
        return []
    from fsmeta.data.io import image_to_unit, is_mask_name, list_images, read_image

    # a folder of images and masks together (Cellpose's layout, or Fiji's ROI sets beside the images) gives its images only
    files = [f for f in list_images(pool, "--pool", annotations=True) if f.stem not in support and not is_mask_name(f)]
    if not files:
        raise FsmetaError(f"--pool {pool}: every image there is a support image; give images that are not annotated")
    if cfg.finetune.holdout <= 0:
        raise FsmetaError("--pool moves the held-out bands' threshold: it needs finetune.holdout > 0")
    drawn = np.random.default_rng([seed, 104729]).permutation(len(files))[:cfg.eval.pool_images]
    return [image_to_unit(read_image(files[int(k)]), where=str(files[int(k)]), colour=colour) for k in sorted(drawn)]


def evaluate_checkpoint(weights: str | Path, cfg: Config, *, shots: int | None = None,
                        seed: int | None = None, progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a fine-tuned checkpoint on the images its K-shot draw held out (default: the draw
    its description records); returns the summary (with weights, target, shots, seed) and per-image rows."""
    model, meta = model_from_checkpoint(weights)
    prepare_model(model, default_device(), cfg.compute)
    shots = shots if shots is not None else meta.get("shots")
    seed = seed if seed is not None else meta.get("seed", 0)
    if shots is None:
        raise FsmetaError(f"{weights} does not record its K-shot draw; pass --shots and --seed")
    target, _, test = cell_images(cfg, int(shots), int(seed))
    # The threshold, smallest object and predictor the fine-tune chose, as predict uses them.
    threshold = float(meta.get("threshold", cfg.eval.threshold))
    min_size = int(meta.get("min_size", 0))
    tta = bool(meta.get("tta", False))
    summary, rows = evaluate(model, target, test, threshold, compute=cfg.compute, progress=progress, min_size=min_size,
                             tta=tta)
    return {"weights": str(weights), "target": cfg.data.target, "shots": int(shots), "seed": int(seed), "threshold": threshold,
            "min_size": min_size, "tta": tta, **summary}, rows


__all__ = ["FinetuneResult", "cell_images", "evaluate_checkpoint", "finetune_checkpoint"]
