"""Seconds per benchmark cell: fine-tune 20 epochs on a 5-shot support set, then evaluate, on a synthetic domain.

A cell is exactly what ``fsmeta benchmark`` runs per (target, arch, pre-training,
selection, K, seed): :func:`fsmeta.study.run_cell` — load the checkpoint, move it
to the device (CUDA when present), draw K support images, fine-tune on all their
crops at the fine-tune stride, evaluate every other image at full resolution —
with the compute defaults (bf16 autocast + channels_last on CUDA and on a CPU with native bf16,
fp32 elsewhere), and the paper's fine-tune (20 epochs over every crop, no held-out bands, no TTA).
The pre-trained weights are a seeded random initialisation (speed does not depend
on them). The defaults mimic TNBC's geometry (50 images of 512×512, 256×256 crops
at stride 28: 100 crops per image, 500 for K=5, 45 test images).

``--parallel P`` runs P processes at once on the same device, each timing
``--cells`` cells, as ``study.cell_gpus = 1/P`` packs cells on a GPU; the
effective seconds per cell is the wall time over all P × cells cells. One
untimed one-epoch cell per process warms up first (CUDA context, cuDNN autotuning).

    python bench/cell.py                                        # TNBC-like, both archs, this machine's device
    python bench/cell.py --parallel 4                           # four cells sharing the GPU
    python bench/cell.py --image-size 256 --images 12 --archs fcrn --cells 1   # 1 crop per image: a CPU-sized cell
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsmeta.compute import default_device  # noqa: E402
from fsmeta.config import Config, load_config  # noqa: E402


def cell_config(args: argparse.Namespace, root: Path) -> Config:
    return load_config(None, [
        f"data.root={root}",
        f"data.target={args.target}",
        f"data.crop_size={args.crop}",
        f"data.finetune_stride={{default: {args.stride}}}",
        f"data.min_foreground={360 * args.crop * args.crop // (256 * 256)}",
        f"data.synth.images={args.images}",
        f"data.synth.size={args.image_size}",
        # the paper's fine-tune (configs/paper.yaml), which this bench times: epochs over every crop
        # at data.crop_size, no held-out bands, the plain prediction (not the 500-step default)
        f"finetune.epochs={args.epochs}",
        "finetune.steps=0",
        "finetune.crop_size=0",
        "finetune.holdout=0",
        "augment.finetune=false",
        "eval.tta=false",
        "eval.min_size_fraction=0",
        f"finetune.batch_size={args.batch}",
        f"threads={args.threads}",
        "eval.protocol=2020",
        "tracking.enabled=false",
    ])


def _time_cells(cfg_dict: dict, checkpoint: str, arch: str, shots: int, seeds: list[int], eval_share: bool, barrier, results) -> None:
    """One process: a warm-up cell of one epoch, then the timed cells.

    Puts (seconds per cell, seconds of a separate evaluation per cell or [], support crops, test images).
    """
    from fsmeta.config import config_from_dict
    from fsmeta.data.registry import load_dataset
    from fsmeta.evaluate import evaluate
    from fsmeta.study import Cell, run_cell
    from fsmeta.train import apply_threads

    cfg = config_from_dict(cfg_dict)
    apply_threads(cfg)
    target = load_dataset(cfg.data.target, cfg)
    warm = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=1))
    run_cell(warm, target, Path(checkpoint), Cell(cfg.data.target, arch, "scratch", "random", shots, 10_000 + seeds[0]))
    barrier.wait()
    cells, evals, crops, n_test = [], [], [], 0
    for seed in seeds:
        start = time.perf_counter()
        # run_cell ends with the evaluation, which reads every probability map back: no sync needed.
        metrics, model, test = run_cell(cfg, target, Path(checkpoint), Cell(cfg.data.target, arch, "scratch", "random", shots, seed))
        cells.append(time.perf_counter() - start)
        if eval_share:
            e0 = time.perf_counter()
            evaluate(model, target, test, cfg.eval.threshold)  # the evaluation alone, again, for its share
            evals.append(time.perf_counter() - e0)
        crops.append(metrics["support_crops"])
        n_test = len(test)
    results.put((cells, evals, crops, n_test))


def measure(cfg: Config, checkpoint: Path, arch: str, shots: int, cells: int, parallel: int) -> dict:
    """``parallel`` processes time ``cells`` cells each, all at once after their warm-up.

    Returns the mean seconds of a cell, of its evaluation (one process only), and the
    effective seconds per cell: wall time of all cells over their number.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    barrier = ctx.Barrier(parallel + 1)
    procs = [ctx.Process(target=_time_cells, args=(cfg.to_dict(), str(checkpoint), arch, shots,
                                                   [p * cells + c for c in range(cells)], parallel == 1, barrier, results))
             for p in range(parallel)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=3600)  # every process has warmed up
        start = time.perf_counter()
        rows = [results.get() for _ in procs]
        wall = time.perf_counter() - start
    finally:
        for proc in procs:
            proc.join(timeout=60)
    per_cell = [s for r in rows for s in r[0]]
    evals = [s for r in rows for s in r[1]]
    effective = statistics.mean(per_cell) if parallel == 1 else wall / len(per_cell)  # 1: without the extra evaluation
    return {"cell": statistics.mean(per_cell), "eval": statistics.mean(evals) if evals else float("nan"),
            "effective": effective, "crops": sorted({c for r in rows for c in r[2]}), "test": rows[0][3]}


def main(argv: list[str] | None = None) -> int:
    from train_step import machine_line

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["fcrn", "unet"], help="architectures (default: fcrn unet)")
    p.add_argument("--target", default="synth-he", help="synthetic domain (default: synth-he)")
    p.add_argument("--image-size", type=int, default=512, help="image side (default: 512, as TNBC)")
    p.add_argument("--images", type=int, default=50, help="images in the domain (default: 50, as TNBC)")
    p.add_argument("--crop", type=int, default=256, help="crop side (default: 256)")
    p.add_argument("--stride", type=int, default=28, help="fine-tune stride (default: 28, TNBC's)")
    p.add_argument("--shots", type=int, default=5, help="K support images (default: 5)")
    p.add_argument("--epochs", type=int, default=20, help="fine-tune epochs (default: 20)")
    p.add_argument("--batch", type=int, default=64, help="fine-tune batch (default: 64)")
    p.add_argument("--cells", type=int, default=2, help="timed cells per process (default: 2)")
    p.add_argument("--parallel", type=int, default=1, help="processes sharing the device (default: 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default: torch's; with --parallel, 1)")
    p.add_argument("--data-root", help="where to generate the synthetic domain (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.parallel > 1 and not args.threads:
        args.threads = 1

    device = default_device()
    print(machine_line(device))
    print(f"cell: {args.target} {args.images} images {args.image_size}², crops {args.crop}² at stride {args.stride}, K={args.shots}, "
          f"{args.epochs} epochs, batch {args.batch}, compute defaults; {args.parallel} process(es) × {args.cells} timed cell(s)\n")
    from fsmeta.data.registry import load_dataset
    from fsmeta.train import scratch_checkpoint

    with tempfile.TemporaryDirectory(prefix="fsmeta-bench-") as tmp:
        root = Path(args.data_root or tmp)
        cfg = cell_config(args, root)
        load_dataset(cfg.data.target, cfg)  # generate once, before any process reads it
        print(f"{'arch':<5} {'processes':>9} {'support crops':>13} {'test images':>11} {'s/cell':>8} {'of which eval':>13} {'effective s/cell':>16}")
        ratios = []
        for arch in args.archs:
            acfg = dataclasses.replace(cfg, arch=arch)
            checkpoint = scratch_checkpoint(acfg, Path(tmp) / arch)
            runs = {}
            for parallel in sorted({1, args.parallel}):
                r = runs[parallel] = measure(acfg, checkpoint, arch, args.shots, args.cells, parallel)
                crops = "/".join(map(str, r["crops"]))
                share = f"{r['eval']:.2f}" if parallel == 1 else "-"
                print(f"{arch:<5} {parallel:>9} {crops:>13} {r['test']:>11} {r['cell']:>8.2f} {share:>13} {r['effective']:>16.2f}", flush=True)
            if args.parallel > 1:
                ratios.append(f"{arch}: {args.parallel} cells at once / one at a time = "
                              f"{runs[1]['effective'] / runs[args.parallel]['effective']:.2f}× the cells per second")
            ratios.append(f"{arch}: one cell alone {runs[1]['cell']:.2f} s (target on a GPU: < 10 s), evaluation "
                          f"{100 * runs[1]['eval'] / runs[1]['cell']:.0f} % of it")
    print("\nratios (this run):")
    for line in ratios:
        print("  " + line)
    print("\n'effective s/cell': wall time per cell while P processes share the device (P=1: s/cell). "
          "'cells at once / one at a time' is bench/project_paper.py's --packing-gain.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
