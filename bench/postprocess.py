"""Post-processing of benchmark cells, paired on the same fine-tuned model: the test mIoU with
predicted objects under a fraction of the support's median annotated object dropped
(``eval.min_size_fraction``), and with the mean over the 8 flips and 90° turns (``eval.tta``).

Each cell ``TARGET:K:SPLIT`` is ``fsmeta benchmark``'s own cell (:func:`fsmeta.study.run_cell`:
random selection, the run's θ′ of ``--pretraining``), run once; then its test images are scored
under every fraction, with and without TTA, at the threshold the fine-tune chose. Prints one
line per cell (JSON): the benchmark's own mIoU and smallest object beside the variants, and the
seconds of the plain and the TTA predictions. ``cal``, ``tta_cal0`` and ``tta_cal`` re-choose the
held-out bands' threshold at the fine-tuned weights (:meth:`fsmeta.finetune.HeldOut.calibrate`): on
the plain prediction with small objects dropped, on the TTA mean (``eval.tta``'s rule), and on the
TTA mean with small objects dropped; each is scored with the benchmark's smallest object.
``--mirrors`` adds the mean over the four mirrorings alone (``m4_``, no quarter turns: nnU-Net's and
Cellpose's TTA), its bands' threshold re-chosen on it as ``eval.tta`` does (``m4_cal0``), and its
seconds. ``--checkpoint scratch`` fine-tunes the seeded random initialisation (the benchmark's
scratch start, no pretext) instead of the run's θ′; then ``--run`` is not needed.
``--oracle`` adds what a perfect threshold would give on the TTA mean: the test mIoU at each
threshold of the bands' grid (small objects dropped as the cell drops them) and its best
(``oracle``, ``oracle_threshold``) — read from the test masks, an upper bound for any rule that
chooses the threshold, never a way to choose one. ``--curves N`` adds the curves of the threshold
grid (test mIoU, the bands' IoU, the foreground share of N unannotated pool images) and
``tta_pool``: the mIoU at ``eval.pool_threshold``'s choice from those N images
(:meth:`fsmeta.finetune.HeldOut.match_pool`), with its record (``pool_ratio``, ``pool_used``).

    python bench/postprocess.py --config configs/real3.yaml --data-root ../data --run runs/real3-v3 \\
        em:1:0 em:5:0 sstem:1:0 sstem:5:0 tnbc:5:0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import fsmeta.finetune  # noqa: E402

from fsmeta.compute import inference_model  # noqa: E402
from fsmeta.config import load_config  # noqa: E402
from fsmeta.data.registry import load_dataset  # noqa: E402
from fsmeta.evaluate import predict_probability  # noqa: E402
from fsmeta.metrics import drop_small, iou, median_object_area  # noqa: E402
from fsmeta.models import DihedralTTA  # noqa: E402
from fsmeta.models.tta import MIRRORS  # noqa: E402
from fsmeta.finetune import pool_share_curve  # noqa: E402
from fsmeta.study import (Cell, _selected_support, annotation_composition, cell_split, run_cell, support_masks,  # noqa: E402
                          target_config, unannotated_draw)
from fsmeta.train import apply_threads, scratch_checkpoint  # noqa: E402

FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5)


@contextlib.contextmanager
def grid_top(top: float | None):
    """The held-out threshold grid's upper end set to ``top`` for the block (None: unchanged)."""
    saved = fsmeta.finetune.THRESHOLD_RANGE
    if top is not None:
        fsmeta.finetune.THRESHOLD_RANGE = (saved[0], top)
    try:
        yield
    finally:
        fsmeta.finetune.THRESHOLD_RANGE = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data-root")
    p.add_argument("--run", help="a benchmark's --out (its pretrained/<target>/<arch>/<pretraining>/pretext.safetensors)")
    p.add_argument("--checkpoint", choices=["scratch"], help="fine-tune the seeded random initialisation instead of --run's θ′")
    p.add_argument("--mirrors", action="store_true", help="also score the mean over the four mirrorings (no turns)")
    p.add_argument("--oracle", action="store_true", help="also the test mIoU at the best single threshold of the grid (TTA mean)")
    p.add_argument("--pretraining", default="meta-all")
    p.add_argument("--grid-top", type=float, action="append", default=[], metavar="T",
                   help="also re-choose the TTA threshold on a grid up to T (repeatable; the default grid stops at "
                        f"{fsmeta.finetune.THRESHOLD_RANGE[1]})")
    p.add_argument("--curves", type=int, default=0, metavar="N",
                   help="also print, on the TTA mean, the test mIoU (implies --oracle), the bands' IoU and the predicted "
                        "foreground share of N unannotated pool images (never a test image) at every threshold of the grid")
    p.add_argument("cells", nargs="+", help="TARGET:K:SPLIT")
    args = p.parse_args(argv)
    args.oracle = args.oracle or bool(args.curves)
    if not args.run and not args.checkpoint:
        p.error("give --run (the θ′ of a benchmark) or --checkpoint scratch")
    scratch_dir = tempfile.TemporaryDirectory()
    for spec in args.cells:
        name, k, s = spec.split(":")
        k, s = int(k), int(s)
        cfg = load_config(args.config, [f"data.root={args.data_root}"] if args.data_root else [])
        cfg = target_config(cfg, name, cfg.arch)
        apply_threads(cfg)
        target = load_dataset(name, cfg)
        if args.checkpoint == "scratch":
            checkpoint = scratch_checkpoint(cfg, scratch_dir.name)
        else:
            checkpoint = Path(args.run) / "pretrained" / name / cfg.arch / args.pretraining / "pretext.safetensors"
        cell = Cell(name, cfg.arch, args.checkpoint or args.pretraining, "random", k, s)
        # the benchmark's own cell (fine-tuned and scored as it is), then its support's windows again
        metrics, model, test = run_cell(cfg, target, checkpoint, cell)
        pool, _ = cell_split(cfg, len(target), s)
        support = _selected_support(cfg, target, model, pool, test, cell)
        threshold, median = metrics["threshold"], median_object_area(support_masks(target, support.windows))
        # the bands' threshold chosen again as the evaluation scores (HeldOut.calibrate): objects
        # under the benchmark's min size dropped, with and without TTA
        size = metrics["min_size"]
        band = {}
        if support.holdout is not None:
            plain_band = metrics.get("holdout_raw_threshold", threshold)  # the plain validation's choice (ties go nearest it)
            variants = {"cal": (size, False, None), "tta_cal0": (0, True, None), "tta_cal": (size, True, None)}  # None: the 8 transforms
            for top in args.grid_top:  # the TTA mean's threshold on a grid reaching higher than THRESHOLD_RANGE's
                variants[f"tta_top{top:g}"] = (0, True, None)
            if args.mirrors:
                variants["m4_cal0"] = (0, True, MIRRORS)
            for tag, (ms, tta, transforms) in variants.items():
                support.holdout.threshold = plain_band
                top = float(tag[len("tta_top"):]) if tag.startswith("tta_top") else None
                with grid_top(top):
                    band[tag] = support.holdout.calibrate(model, cfg.compute, ms, tta, transforms)[1]
                if tag == "tta_cal0":  # eval.tta's own choice: its IoU curve is --curves' band curve
                    band_curve = support.holdout.calibration
        if args.curves:
            unannotated = [target.image(int(i)) for i in unannotated_draw(pool, support.images, args.curves, s)]
            share_curve = pool_share_curve(DihedralTTA(inference_model(model, cfg.compute)), unannotated, cfg.compute)
            if support.holdout is not None:
                # eval.pool_threshold's choice (HeldOut.match_pool) from the bands' TTA threshold, as
                # decision_rule takes it
                support.holdout.threshold = band["tta_cal0"]
                band["tta_pool"] = support.holdout.match_pool(
                    annotation_composition(target, support.windows)["support_foreground"], share_curve)
        plain = inference_model(model, cfg.compute)
        scorers = {"": plain, "tta_": DihedralTTA(plain)}
        if args.mirrors:
            scorers["m4_"] = DihedralTTA(plain, MIRRORS)
        scores = {f"{tag}f{f:g}": [] for tag in scorers for f in FRACTIONS}
        seconds = dict.fromkeys(scorers, 0.0)
        grid = [b / fsmeta.finetune.THRESHOLD_BINS for b in fsmeta.finetune.threshold_grid(fsmeta.finetune.THRESHOLD_BINS)]
        oracle = np.zeros(len(grid))
        for i in test:
            image, truth = target.image(int(i)), target.masks[int(i)] > 0
            for tag, scorer in scorers.items():
                t0 = time.perf_counter()
                prob = predict_probability(scorer, image, cfg.compute)
                seconds[tag] += time.perf_counter() - t0
                for f in FRACTIONS:
                    scores[f"{tag}f{f:g}"].append(iou(drop_small(prob >= threshold, int(round(f * median))), truth))
                if args.oracle and tag == "tta_":
                    oracle += [iou(drop_small(prob >= t, size), truth) for t in grid]
                for name_, t in band.items():  # each re-chosen threshold on the predictor it was chosen on
                    if max((t_ for t_ in scorers if name_.startswith(t_)), key=len) == tag:
                        scores.setdefault(name_, []).append(iou(drop_small(prob >= t, size), truth))
        curves = {}
        if args.curves:
            curves = {"test_curve": [round(float(v) / len(test), 4) for v in oracle],
                      "grid": grid, **annotation_composition(target, support.windows),
                      "pool_curve": [round(float(share_curve[int(round(t * fsmeta.finetune.THRESHOLD_BINS))]), 5) for t in grid]}
            if support.holdout is not None:
                curves["band_curve"] = [round(float(band_curve[int(round(t * fsmeta.finetune.THRESHOLD_BINS))]), 4)
                                        for t in grid]
                curves["band_foreground"] = float(np.mean(np.concatenate([m.ravel() for m in support.holdout.masks])))
                curves.update(support.holdout.pool or {})
        print(json.dumps({"cell": spec, "threshold": threshold, "median_object_px": median,
                          **{f"{k}_threshold": t for k, t in band.items()},
                          "benchmark_miou": round(100 * metrics["miou"], 1), "benchmark_min_size": metrics["min_size"],
                          "plain_s": round(seconds[""], 1), "tta_s": round(seconds["tta_"], 1),
                          **({"m4_s": round(seconds["m4_"], 1)} if args.mirrors else {}),
                          **({"oracle": round(100 * float(oracle.max()) / len(test), 1),
                              "oracle_threshold": grid[int(np.argmax(oracle))]} if args.oracle else {}),
                          **{key: round(100 * float(np.mean(v)), 1) for key, v in scores.items()}, **curves}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
