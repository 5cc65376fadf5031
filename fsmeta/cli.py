"""The ``fsmeta`` command line: argument parsing only; the work happens in the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

# Safe, quiet defaults for a tool that runs on laptops without internet; a user can still opt in.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from fsmeta.config import SELECT_METHODS, SelectConfig  # noqa: E402
from fsmeta.data.catalogue import PUBLIC_NAMES  # noqa: E402
from fsmeta.errors import FsmetaError  # noqa: E402


from fsmeta.data.colour import COLOURS  # noqa: E402

COLOUR_HELP = ("the one channel colour images become: grey (luminance), haematoxylin (the haematoxylin stain alone, "
               "for H&E-like stained brightfield), or auto: haematoxylin when most images are stained brightfield RGB, "
               "else grey; grey images stay grey (default: auto; the store records it; docs/user-guide.md)")


def default_device():
    from fsmeta.compute import default_device as device

    return device()


def _config_args(p: argparse.ArgumentParser, default_help: str = "the built-in defaults (the paper's values)") -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="YAML", help=f"run configuration file (default: {default_help})")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration value, e.g. --set meta.alpha=0.1 (repeatable)")
    d = p.add_argument_group("data")
    d.add_argument("--data-root", metavar="DIR", help="prepared data sets (default: $FSMETA_DATA or ./data)")
    d.add_argument("--target", metavar="NAME", help="target data set, left out of the sources (default: from the config, synth-he)")
    d.add_argument("--sources", metavar="NAME,NAME", help="source data sets (default: every other data set of the target's kind)")
    h = p.add_argument_group("hardware")
    h.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    t = p.add_argument_group("tracking")
    t.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    t.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: fsmeta)")
    t.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow (default: log)")


def _load(args: argparse.Namespace, demo: bool = False):
    from fsmeta.config import load_config
    from fsmeta.study import demo_config

    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.target:
        overrides.append(f"data.target={args.target}")
    if args.sources:
        overrides.append("data.sources=[" + ",".join(s.strip() for s in args.sources.split(",") if s.strip()) + "]")
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.experiment:
        overrides.append(f"tracking.experiment={args.experiment}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    for name in ("backend",):
        if getattr(args, name, None):
            overrides.append(f"meta.{name}={getattr(args, name)}")
    for name in ("trials", "scheduler", "search"):
        if getattr(args, name, None) is not None:
            overrides.append(f"tune.{name}={getattr(args, name)}")
    cfg = demo_config(args.config, overrides) if demo else load_config(args.config, overrides)
    return cfg


def _tracker(cfg):
    from fsmeta.tracking import tracker_from_config

    return tracker_from_config(cfg.tracking)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from fsmeta.config import SynthConfig
    from fsmeta.data import synth
    from fsmeta.data.registry import write_synthetic

    root = _data_root(args)
    domains = args.domains or list(synth.DOMAINS)
    unknown = [d for d in domains if d not in synth.DOMAINS]
    if unknown:
        raise FsmetaError(f"unknown synthetic domain {unknown[0]!r}; choose from {', '.join(synth.DOMAINS)}")
    cfg = SynthConfig(images=args.images, size=args.size, seed=args.seed)
    for d in domains:
        t0 = time.perf_counter()
        path = write_synthetic(root, d, cfg)
        print(f"{d}: {args.images} images {args.size}×{args.size} → {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from fsmeta.data import synth
    from fsmeta.data.store import list_stores

    root = _data_root(args)
    stores = list_stores(root)
    print(f"data root: {root.resolve()}")
    if stores:
        print(f"{'name':<16}{'kind':<11}{'images':>7}  {'size (W×H)':<14}{'on disk':>9}{'foreground':>12}")
        for m in stores:
            shapes = {tuple(s) for s in m.get("shapes", [])}
            size = "×".join(map(str, reversed(next(iter(shapes))))) if len(shapes) == 1 else "mixed"
            print(f"{m['name']:<16}{m['kind']:<11}{m['images']:>7}  {size:<14}{m['bytes'] / 2**20:>7.1f}MB{100 * m['foreground_fraction']:>11.1f}%")
    else:
        print("no prepared data sets")
    missing = [d for d in synth.DOMAINS if d not in {m["name"] for m in stores}]
    if missing:
        print(f"synthetic domains generated on first use: {', '.join(missing)}")
    return 0


def _data_root(args: argparse.Namespace) -> Path:
    return Path(args.data_root or os.environ.get("FSMETA_DATA") or "data")


def _refuse_existing(root: Path, name: str, replace: bool) -> None:
    from fsmeta.data.store import check_replaceable, read_meta

    check_replaceable(root, name)
    meta = read_meta(root, name)
    if meta is not None and not replace:
        raise FsmetaError(f"data set {name!r} already exists under {root} ({meta.get('kind')}, {meta.get('images')} images); "
                          "pass --replace to overwrite it")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from fsmeta.data.prepare import prepare

    if bool(args.source) == bool(args.download):
        raise FsmetaError("give exactly one of --from PATH (an unpacked or downloaded copy) and --download")
    root = _data_root(args)
    _refuse_existing(root, args.name, args.replace)
    t0 = time.perf_counter()
    path = prepare(args.name, root, args.source, download_files=args.download, mirror=args.mirror, downloads=args.downloads,
                   colour=args.colour)
    from fsmeta.data.store import read_meta

    meta = read_meta(root, args.name) or {}
    print(f"{args.name}: {meta.get('images')} images, foreground {100 * meta.get('foreground_fraction', 0):.1f}% → {path} "
          f"({time.perf_counter() - t0:.1f} s)")
    print(f"colour: {meta.get('colour', 'grey')} ({meta.get('colour_reason', '')})")
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from fsmeta.data.io import import_folder
    from fsmeta.data.store import read_meta

    root = _data_root(args)
    _refuse_existing(root, args.name, args.replace)
    path = import_folder(root, args.name, args.images, args.masks, colour=args.colour)
    meta = read_meta(root, args.name) or {}
    print(f"{args.name}: imported {meta.get('images')} image/mask pairs ({meta.get('image_dtype')}), "
          f"foreground {100 * meta.get('foreground_fraction', 0):.1f}% → {path}")
    print(f"colour: {meta.get('colour', 'grey')} ({meta.get('colour_reason', '')})")
    print(f"use it with --target {args.name} or --sources {args.name},…")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fsmeta.checkpoint import model_from_checkpoint
    from fsmeta.compute import inference_model, prepare_model
    from fsmeta.predict import PredictSettings, list_inputs, resolve_weights

    settings = PredictSettings(tile=args.tile, overlap=args.overlap, batch=args.batch,
                               threshold=args.threshold if args.threshold is not None else 0.5,
                               watershed=args.watershed, min_distance=args.min_distance, min_size=args.min_size or 0,
                               rois=_roi_formats(args.rois)).check()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    inputs = list_inputs(args.input)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fsmeta-weights-") as cache:  # an MLflow download lives only until loaded
        model, meta = model_from_checkpoint(resolve_weights(args.weights, tracking_uri=args.tracking_uri or "", cache=cache))
    # bf16 + channels_last where the device has native bf16, with batch norm folded in; fp32 elsewhere
    model = inference_model(prepare_model(model, default_device()))
    if args.tta is None:  # the fine-tune's predictor (eval.tta), whose mean its threshold was chosen on
        args.tta = bool(meta.get("tta", False))
    if args.tta:  # the mean over the 8 flips and 90° turns: 8× the forward passes
        from fsmeta.models import DihedralTTA

        model = DihedralTTA(model)
    from fsmeta.data.colour import checkpoint_colour

    settings = dataclasses.replace(settings, colour=checkpoint_colour(meta)).check()  # the channel it was fine-tuned on
    if args.threshold is None and "threshold" in meta:
        settings = dataclasses.replace(settings, threshold=float(meta["threshold"])).check()
    if args.min_size is None and "min_size" in meta:  # the fine-tune's smallest object (eval.min_size_fraction)
        settings = dataclasses.replace(settings, min_size=int(meta["min_size"])).check()
    from fsmeta.large import predict_inputs  # huge TIFFs and OME-Zarr stream band by band, the rest as before

    rows = predict_inputs(model, inputs, args.output, settings, large_output=args.large_output)
    out = Path(args.output)
    total = sum(r.cells for r in rows)
    folders = "masks/, labels/, overlays/" + (", rois/" if settings.rois else "")
    print(f"{len(rows)} image(s), {total} cells ({meta.get('arch')} weights {args.weights}); {folders} and counts.csv in {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from fsmeta.predict import resolve_weights

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fsmeta-weights-") as cache:
        weights = resolve_weights(args.weights, tracking_uri=args.tracking_uri or "", cache=cache)
        if args.format == "onnx":
            from fsmeta.export import ONNX_TOLERANCE, export_onnx

            out, diff = export_onnx(weights, args.out)
            print(f"ONNX model: {out} (ONNX Runtime vs PyTorch: max |Δp| {diff:.1e}, tolerance {ONNX_TOLERANCE:g})")
            return 0
        from fsmeta.export import PackageInfo, export_bioimageio

        info = PackageInfo(name=args.name or "", authors=tuple(args.author or ()), license=args.license, sample=args.sample)
        out = export_bioimageio(weights, args.out, info, check=not args.no_check, progress=True)
    print(f"BioImage.IO model package: {out}" + ("" if args.no_check else " (bioimageio.core's model test passed)"))
    return 0


def _roi_formats(text: str | None) -> tuple[str, ...]:
    from fsmeta.rois import parse_formats

    return parse_formats(text) if text else ()


def cmd_meta_train(args: argparse.Namespace) -> int:
    from fsmeta.train import meta_train

    cfg = _load(args)
    path = meta_train(cfg, args.out, _tracker(cfg), resume=args.resume)
    print(f"meta-trained weights: {path}")
    return 0


def cmd_transfer_train(args: argparse.Namespace) -> int:
    from fsmeta.train import transfer_train

    cfg = _load(args)
    path = transfer_train(cfg, args.out, _tracker(cfg))
    print(f"transfer-trained weights: {path}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from fsmeta.train import apply_threads
    from fsmeta.workflows import finetune_checkpoint

    cfg = _load(args)
    apply_threads(cfg)
    r = finetune_checkpoint(args.weights, cfg, args.out, _tracker(cfg), shots=args.shots, seed=args.seed,
                            support_images=args.support_images, support_masks=args.support_masks, register=args.register or "",
                            pool=args.pool)
    if r.note:
        print(f"note: {r.note}")
    where = f"annotated image(s) of {args.support_images}" if args.support_images else f"image(s) of {r.target}"
    print(f"fine-tuned on {r.images} {where} ({r.crops} crops of {r.crop_size}×{r.crop_size}, "
          f"final loss {r.final_loss:.4f}): {r.path}")
    if r.registered:
        print(f"registered in MLflow as {r.registered}: fsmeta predict --weights {r.registered} …")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fsmeta.train import apply_threads
    from fsmeta.workflows import evaluate_checkpoint

    cfg = _load(args)
    apply_threads(cfg)
    report, rows = evaluate_checkpoint(args.weights, cfg, shots=args.shots, seed=args.seed)
    print(f"{cfg.data.target}: {report['n_images']} test image(s)  mIoU {report['miou']:.4f}  pooled IoU {report['pooled_iou']:.4f}  "
          f"instance P/R/F1 {report['precision']:.3f}/{report['recall']:.3f}/{report['f1']:.3f}")
    if args.out:
        from fsmeta.atomic import atomic_write_bytes

        atomic_write_bytes(Path(args.out), (json.dumps({**report, "images": rows}, indent=2, default=float) + "\n").encode())
        print(f"report: {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fsmeta.report import format_table, summarize
    from fsmeta.benchmark import run_demo

    cfg = _load(args, demo=True)
    t0 = time.perf_counter()
    tracker = _tracker(cfg)
    rows = run_demo(cfg, args.out, tracker)
    out = Path(args.out)
    print()
    print(f"mIoU (%) on {cfg.data.target}, mean ± std over {len(cfg.eval.seeds)} seeds ({cfg.arch}, {cfg.eval.protocol} protocol):")
    print(format_table(summarize(rows)))
    print()
    print(f"results: {out / 'results.csv'}, {out / 'results.parquet'}; plot: {out / 'miou_vs_shots.png'}")
    if cfg.tracking.enabled:
        from fsmeta.tracking import resolve_uri

        print(f"MLflow runs: {resolve_uri(cfg.tracking.uri)} (view with: mlflow ui --backend-store-uri {resolve_uri(cfg.tracking.uri)} "
              f"--host 127.0.0.1, then open {tracker.runs_page()})")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from fsmeta.benchmark import benchmark_table, run_benchmark

    cfg = _load(args)
    t0 = time.perf_counter()
    rows = run_benchmark(cfg, args.out, _tracker(cfg), resume=args.resume)
    print()
    print(f"mIoU (%), mean ± std over {len(cfg.eval.seeds)} seed(s), {cfg.eval.protocol} protocol:")
    print(benchmark_table(rows))
    print(f"\nresults, summary and figures in {args.out}; wall time {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from fsmeta.tuning import METRIC, run_study

    cfg = _load(args)
    t0 = time.perf_counter()
    best = run_study(cfg, args.space, args.out, _tracker(cfg), resume=args.resume, weights=args.weights)
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["values"].items())
    print(f"\nbest of {best['trials']} trial(s): {METRIC} {best[METRIC]:.4f} after {best['meta_iterations']} meta-iterations ({values})")
    print(f"trials in {args.out}/trials.csv; the best configuration in {args.out}/best.yaml "
          f"(fsmeta meta-train --config {args.out}/best.yaml); wall time {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fsmeta.report import format_table, read_results, render_report, summarize

    rows = read_results(args.dir)
    for path in render_report(args.dir, rows):
        print(f"wrote {path}")
    print(format_table(summarize(rows)))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from fsmeta.select.outputs import select_for_annotation
    from fsmeta.train import apply_threads

    gamma = None
    if args.gamma is not None:
        try:
            gamma = "auto" if args.gamma == "auto" else float(args.gamma)
        except ValueError:
            raise FsmetaError(f"--gamma must be 'auto' or a number in [0, 1], got {args.gamma!r}") from None
        if gamma != "auto" and not 0.0 <= gamma <= 1.0:
            raise FsmetaError(f"--gamma={gamma} must lie in [0, 1] (a value of the histogram-equalised image)")
    cfg = _load(args)
    if args.patch_size is not None:
        cfg.select.patch_size = args.patch_size
    # Tiles for a person do not overlap, unless asked; the benchmark keeps the paper's overlapping grid.
    if args.patch_stride is not None or cfg.select.patch_stride == 0:
        cfg.select.patch_stride = args.patch_stride or cfg.select.patch_size
    if cfg.select.patch_size < 8 or cfg.select.patch_stride < 1:
        raise FsmetaError(f"--patch-size must be at least 8 and --patch-stride at least 1, got {cfg.select.patch_size} and {cfg.select.patch_stride}")
    apply_threads(cfg)
    t0 = time.perf_counter()
    report = select_for_annotation(args.weights, args.select_target, cfg, args.budget, args.out, method=args.method,
                                   unit=args.unit, gamma=gamma, seed=args.seed)
    sel = report.selection
    print(f"{sel.method}: selected {sel.budget} of {len(sel.ranking)} {sel.unit}(s) in {time.perf_counter() - t0:.0f} s")
    for k, (it, name) in enumerate(zip(sel.selected[:10], report.names), 1):
        print(f"  #{k:<3} score {it.score:.4g}  {name}")
    folder = report.to_annotate[0].parent
    print(f"ranking: {report.ranking}\nto annotate: {folder}/ ({len(report.to_annotate)} file(s))\n"
          f"contact sheet: {report.contact_sheet}")
    print(f"the model predicts foreground in {100 * report.selected_foreground:.1f}% of the selected pixels "
          f"(all candidates: {100 * report.pool_foreground:.1f}%)")
    if report.mostly_background:
        what = {"typiclust": "typiclust takes typical members of the candidates θ′ predicts to hold cells",
                "coverage": "coverage takes what best covers the patches θ′ predicts to hold cells"}
        if sel.method in what:
            advice = f"{what[sel.method]}; θ′ sees few cells in them: check that the weights suit these images"
        else:
            advice = ("on TNBC and EM the consistency score picked empty patches first and fine-tuned far below "
                      "random (docs/results.md); consider --method typiclust, which picks among what θ′ predicts to hold cells")
        print(f"warning: the selection is mostly what the model sees as background; look at "
              f"{report.contact_sheet.name}. {advice[0].upper()}{advice[1:]}", file=sys.stderr)
    start = report.pretext or args.weights
    if report.pretext:
        print(f"pretext model θ′: {report.pretext}")
    print(f"next: annotate {folder}/ and save the masks (or the Fiji ROI sets / QuPath GeoJSON) with the same names in a folder MASKS, then\n"
          f"  fsmeta finetune --weights {start} --support-images {folder} --support-masks MASKS --out finetuned.safetensors")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsmeta", description="Few-shot microscopy cell segmentation by meta-learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare and list data sets").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("synth", help="generate the synthetic domains into the data root")
    p.add_argument("--data-root", metavar="DIR", help="where to write (default: $FSMETA_DATA or ./data)")
    p.add_argument("--domains", nargs="+", metavar="NAME", help="which domains (default: all five)")
    p.add_argument("--images", type=int, default=40, help="images per domain (default: 40)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("list", help="show the prepared data sets")
    p.add_argument("--data-root", metavar="DIR", help="data root (default: $FSMETA_DATA or ./data)")
    p.set_defaults(func=cmd_data_list)
    p = data.add_parser("prepare", help=f"prepare a public data set ({', '.join(PUBLIC_NAMES)}) into the data root")
    p.add_argument("name", choices=PUBLIC_NAMES, metavar="NAME", help=", ".join(PUBLIC_NAMES))
    src = p.add_argument_group("input")
    src.add_argument("--from", dest="source", metavar="PATH",
                     help="the download as it unpacks, or the folder holding its .zip files (default: none; or use --download)")
    src.add_argument("--download", action="store_true", help="download the public files first, resumably (default: off)")
    src.add_argument("--mirror", metavar="URL", help="with --download: fetch the same file names from this base URL (default: the public URLs)")
    src.add_argument("--downloads", metavar="DIR", help="where downloads and unpacked archives go (default: DATA_ROOT/.downloads/NAME)")
    dst = p.add_argument_group("output")
    dst.add_argument("--data-root", metavar="DIR", help="where to write (default: $FSMETA_DATA or ./data)")
    dst.add_argument("--replace", action="store_true", help="overwrite an existing data set of that name (default: refuse)")
    dst.add_argument("--colour", choices=COLOURS, default="auto", help=COLOUR_HELP)
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("import", help="import your own folders of images and masks as a data set")
    p.add_argument("name", metavar="NAME", help="the data set's name, then usable with --target/--sources")
    src = p.add_argument_group("input")
    src.add_argument("--images", required=True, metavar="DIR", help="folder of images: .tif/.tiff/.png/.jpg/.jpeg/.bmp, 8/16-bit, grey or RGB (required)")
    src.add_argument("--masks", required=True, metavar="DIR",
                     help="folder of binary or instance masks named like the images, optionally ending _mask/_label/_gt, or of the outlines "
                     "drawn in Fiji (ROI sets, .zip/.roi), QuPath (.geojson) or ImageScope (.xml), or Cellpose's _seg.npy; may be the image folder itself, "
                     "as in Cellpose's 000_img.png + 000_masks.png; or one COCO .json file annotating every image (CVAT, Label Studio, "
                     "Roboflow); or a folder per image of one mask per object (the Data Science Bowl 2018's ID/images + ID/masks "
                     "layout: give it as both --images and --masks) (required)")
    dst = p.add_argument_group("output")
    dst.add_argument("--data-root", metavar="DIR", help="where to write (default: $FSMETA_DATA or ./data)")
    dst.add_argument("--replace", action="store_true", help="overwrite an existing data set of that name (default: refuse)")
    dst.add_argument("--colour", choices=COLOURS, default="auto", help=COLOUR_HELP)
    p.set_defaults(func=cmd_data_import)

    p = sub.add_parser("meta-train", help="Reptile meta-training on the source data sets")
    _config_args(p)
    p.add_argument("--out", default="runs/meta", metavar="DIR", help="output folder (default: runs/meta)")
    p.add_argument("--backend", choices=["sequential", "ray"], help="where inner loops run (default: from the config)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/meta-last.safetensors (default: start anew)")
    p.set_defaults(func=cmd_meta_train)

    p = sub.add_parser("transfer-train", help="the transfer-learning baseline on the union of the sources")
    _config_args(p)
    p.add_argument("--out", default="runs/transfer", metavar="DIR", help="output folder (default: runs/transfer)")
    p.set_defaults(func=cmd_transfer_train)

    p = sub.add_parser("finetune", help="fine-tune pre-trained weights on K target images")
    _config_args(p)
    p.add_argument("--weights", required=True, metavar="CKPT", help="pre-trained checkpoint (.safetensors)")
    p.add_argument("--shots", type=int, default=5, metavar="K", help="annotated target images (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="which seeded K-shot draw (default: 0)")
    p.add_argument("--out", default="runs/finetuned.safetensors", metavar="CKPT", help="output checkpoint (default: runs/finetuned.safetensors)")
    u = p.add_argument_group("your own annotated images (instead of --target's K-shot draw)")
    u.add_argument("--support-images", metavar="DIR", help="fine-tune on every image of this folder (default: none; use --target)")
    u.add_argument("--support-masks", metavar="DIR", help="their masks, or Fiji ROI sets / QuPath GeoJSON, paired by name, or one COCO .json file, as in `fsmeta data import` (default: none)")
    u.add_argument("--pool", metavar="DIR", help="unannotated images of the same kind (e.g. `fsmeta select`'s --target folder): "
                   "the threshold moves toward the one at which eval.pool_images of them are predicted the support's foreground "
                   "share, unless the two disagree (eval.pool_threshold, on by default; docs/results.md) (default: the held-out bands' threshold alone)")
    p.add_argument("--register", metavar="NAME", help="also register the weights in MLflow's model registry as a new version of "
                   "NAME, usable as --weights models:/NAME/<version> (default: do not register)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="score weights on the target's test images at full resolution")
    _config_args(p)
    p.add_argument("--weights", required=True, metavar="CKPT", help="fine-tuned checkpoint (.safetensors)")
    p.add_argument("--shots", type=int, metavar="K", help="the K-shot draw whose support images are excluded (default: recorded in the checkpoint)")
    p.add_argument("--seed", type=int, help="the seed of that draw (default: recorded in the checkpoint)")
    p.add_argument("--out", metavar="JSON", help="also write the summary and per-image metrics here (default: print only)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("benchmark", help="the leave-one-data-set-out study: targets × pre-trainings × K × seeds on Ray")
    _config_args(p)
    p.add_argument("--out", default="runs/benchmark", metavar="DIR", help="output folder (default: runs/benchmark)")
    p.add_argument("--backend", choices=["sequential", "ray"], help="where meta-training inner loops run (default: from the config)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted benchmark in OUT, skipping recorded cells (default: off)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("tune", help="a Ray Tune study over α, β, ε and learning rates on a validation split (never the test images)")
    _config_args(p)
    g = p.add_argument_group("study")
    g.add_argument("--space", required=True, metavar="YAML", help="search space, e.g. tune_spaces/reptile.yaml (required)")
    g.add_argument("--trials", type=int, metavar="N", help="trials to sample (default: tune.trials, 16)")
    g.add_argument("--scheduler", choices=["asha", "fifo"], help="asha stops weak trials at each validation (default: tune.scheduler, asha)")
    g.add_argument("--search", choices=["random", "optuna"], help="how values are proposed (default: tune.search, random)")
    g.add_argument("--backend", choices=["sequential", "ray"], help="meta-training inside a trial: its own source actors or in-process (default: from the config, ray)")
    g.add_argument("--weights", metavar="W", help="tune fine-tuning of this pre-trained checkpoint instead of meta-training per trial (default: meta-train)")
    g.add_argument("--out", default="runs/tune", metavar="DIR", help="output folder: best.yaml, best.safetensors, trials.csv, Tune's state (default: runs/tune)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted study in OUT with Tune's restore (default: off)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="re-render summary.csv and the figures of a study folder from its results")
    p.add_argument("dir", metavar="DIR", help="a benchmark or demo output folder holding results.parquet")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="segment new images: masks, instance labels, cell counts and overlays")
    g = p.add_argument_group("model")
    g.add_argument("--weights", required=True, metavar="W", help="a .safetensors checkpoint or an MLflow URI such as runs:/<run id>/<path> (required)")
    g.add_argument("--tracking-uri", metavar="URI", help="MLflow server for runs:/ URIs (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    g = p.add_argument_group("input and output")
    g.add_argument("--input", required=True, metavar="DIR_OR_FILE", help="an image or a folder of .tif/.tiff/.png/.jpg/.jpeg/.bmp images (required)")
    g.add_argument("--output", required=True, metavar="DIR", help="where masks/, labels/, overlays/ and counts.csv go (required)")
    g = p.add_argument_group("tiling")
    g.add_argument("--tile", type=int, default=512, metavar="PX", help="tile side in pixels (default: 512)")
    g.add_argument("--overlap", type=int, default=64, metavar="PX", help="overlap of neighbouring tiles; ≥ 64 matches a whole-image pass (default: 64)")
    g.add_argument("--batch", type=int, default=4, metavar="N", help="tiles per forward pass (default: 4)")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("cells")
    g.add_argument("--threshold", type=float, help="foreground where probability ≥ this (default: the threshold the "
                   "fine-tune recorded, else 0.5)")
    g.add_argument("--watershed", action="store_true", help="split touching cells by a distance-transform watershed (default: off)")
    g.add_argument("--min-distance", type=int, default=5, metavar="PX", help="watershed: minimum distance between cell centres (default: 5)")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average the prediction over the 8 flips and 90° turns (8× slower; +1.8 mIoU over 12 real3 cells (10 up), "
                   "docs/results.md). Default: what the fine-tuned checkpoint records (eval.tta, on by default; its "
                   "threshold was chosen on that prediction), else off")
    g.add_argument("--min-size", type=int, metavar="PX", help="drop cells smaller than this many pixels (default: the size a "
                   "fine-tuned checkpoint records, a quarter of its support's median annotated cell; else 0, keep all)")
    g.add_argument("--large-output", choices=["auto", "ome-zarr", "bigtiff"], default="auto",
                   help="masks and labels of a streamed image (OME-Zarr, or a TIFF above 8192² px): auto = BigTIFF "
                        "for TIFF input, OME-Zarr for OME-Zarr input (default: auto)")
    g.add_argument("--rois", metavar="imagej,geojson",
                   help="also write cell outlines under OUT/rois/: imagej (ROI zip for Fiji), geojson (QuPath), or both (default: none)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write weights as ONNX or as a BioImage.IO model package (needs fsmeta[export])")
    g = p.add_argument_group("model")
    g.add_argument("--weights", required=True, metavar="W", help="a .safetensors checkpoint or an MLflow URI such as models:/NAME/1 (required)")
    g.add_argument("--tracking-uri", metavar="URI", help="MLflow server for runs:/ and models:/ URIs (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    g = p.add_argument_group("output")
    g.add_argument("--format", required=True, choices=["onnx", "bioimageio"], help="onnx: one .onnx file; bioimageio: a model-zoo .zip (required)")
    g.add_argument("--out", required=True, metavar="FILE", help="model.onnx or model.zip (required)")
    g = p.add_argument_group("BioImage.IO package")
    g.add_argument("--name", metavar="TEXT", help="the model's name (default: from the checkpoint, e.g. 'fsmeta FCRN fine-tuned on NAME (K 5)')")
    g.add_argument("--author", action="append", metavar="NAME", help="an author, repeatable (default: your login name)")
    g.add_argument("--license", default="CC-BY-4.0", metavar="SPDX", help="licence of the weights (default: CC-BY-4.0)")
    g.add_argument("--sample", metavar="IMAGE", help="test image of your data, centre-cropped to 256 px (default: a synthetic image)")
    g.add_argument("--no-check", action="store_true", help="skip bioimageio.core's model test before writing (default: test)")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("select", help="rank a target's images or patches and pick the ones worth annotating")
    g = p.add_argument_group("input")
    g.add_argument("--weights", required=True, metavar="CKPT", help="pre-trained checkpoint (.safetensors) (required)")
    g.add_argument("--target", dest="select_target", required=True, metavar="NAME_OR_DIR",
                   help="a prepared data set, or a folder of unlabelled .tif/.tiff/.png/.jpg/.jpeg/.bmp images (required)")
    g.add_argument("--data-root", metavar="DIR", help="prepared data sets (default: $FSMETA_DATA or ./data)")
    g = p.add_argument_group("selection")
    g.add_argument("--budget", type=int, required=True, metavar="N", help="how many images or patches to select (required)")
    g.add_argument("--method", choices=SELECT_METHODS,
                   help=f"selection method (default: select.method, {SelectConfig.method}; docs/selection.md)")
    g.add_argument("--unit", choices=["image", "patch"], default="image", help="select whole images or patches (default: image)")
    g.add_argument("--patch-size", type=int, metavar="PX", help="patch side (default: select.patch_size, 256)")
    g.add_argument("--patch-stride", type=int, metavar="PX", help="patch grid step (default: the patch size, non-overlapping tiles)")
    g.add_argument("--gamma", metavar="auto|FLOAT", help="pseudo-label threshold on the equalised image (default: select.gamma of the data set)")
    g.add_argument("--seed", type=int, default=0, help="random/MC-dropout draws and the pretext's crop order (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="writes ranking.csv, to_annotate/ and contact_sheet.png here (required)")
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="YAML", help="run configuration file (default: the built-in defaults, the paper's values)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration value, e.g. --set select.pretext_epochs=20 (repeatable)")
    g = p.add_argument_group("hardware")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_select, target=None, sources=None, tracking_uri=None, experiment=None, no_tracking=False)

    p = sub.add_parser("demo", help="the whole method end to end on synthetic domains, at laptop scale")
    _config_args(p, default_help="the demo's reduced scale, as configs/demo.yaml")
    p.add_argument("--out", default="fsmeta-demo", metavar="DIR", help="output folder (default: ./fsmeta-demo)")
    p.add_argument("--backend", choices=["sequential", "ray"], help="where inner loops run (default: from the config)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FsmetaError as exc:
        print(f"fsmeta: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsmeta: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
