"""Selection methods side by side at laptop scale: a sanity check of the library chain
(pretext → select_support → selection_crops → finetune → evaluate), not the paper's table.

2023 protocol on one target: fixed 20% test split per split seed, the rest the pool;
θ′ = pretext on every target image once per target; every method fine-tunes θ′.
Budgets: ``patch`` = patches-per-image × K (the paper's rule, overlapping grid);
``patch=px`` = as many non-overlapping-equivalent patches as K images have pixels
(equal annotated pixels to ``image``); ``image`` = K whole images.

    python bench/select_demo.py --weights /tmp/demo1/pretrained/meta.safetensors --data-root /tmp/demo1data
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from fsmeta.checkpoint import model_from_checkpoint
from fsmeta.config import load_config
from fsmeta.data.registry import load_dataset
from fsmeta.data.sampling import protocol_split
from fsmeta.evaluate import evaluate
from fsmeta.finetune import finetune
from fsmeta.models import make_bn_affine
from fsmeta.select import patch_grid, pretext_finetune, select_support, selection_crops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, help="pre-trained checkpoint (required)")
    ap.add_argument("--data-root", required=True, help="data root holding the target (required)")
    ap.add_argument("--target", default="synth-he", help="target data set (default: synth-he)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="configuration overrides (repeatable)")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 3], help="K (default: 1 3)")
    ap.add_argument("--splits", type=int, default=3, help="split seeds 0..N-1 (default: 3)")
    ap.add_argument("--methods", nargs="+", default=["random", "entropy", "mc-dropout", "consistency"])
    ap.add_argument("--units", nargs="+", default=["patch", "patch=px", "image"])
    ap.add_argument("--pretext-cache", metavar="PT", help="load θ′ from this file if it exists, else save it there (default: none)")
    args = ap.parse_args()
    cfg = load_config(None, ["threads=2", f"data.root={args.data_root}", f"data.target={args.target}",
                             "data.crop_size=64", "data.min_foreground=22", "data.finetune_stride={default: 32}",
                             "data.synth.images=40", "data.synth.size=128", "select.patch_size=64",
                             "select.pretext_epochs=20", *args.overrides])
    torch.set_num_threads(cfg.threads)
    images = load_dataset(args.target, cfg)
    base, _ = model_from_checkpoint(args.weights)
    t0 = time.perf_counter()
    if args.pretext_cache and Path(args.pretext_cache).is_file():
        theta1 = make_bn_affine(copy.deepcopy(base))
        theta1.load_state_dict(torch.load(args.pretext_cache, weights_only=True))
    else:
        theta1 = pretext_finetune(copy.deepcopy(base), images, cfg, seed=0)
        if args.pretext_cache:
            torch.save(theta1.state_dict(), args.pretext_cache)
    print(f"pretext: {time.perf_counter() - t0:.0f} s")
    h, w = images.images[0].shape
    stride = cfg.select.patch_stride or cfg.data.stride(args.target, "finetune")
    per_image = len(patch_grid(h, w, cfg.select.patch_size, stride))
    px_patches = (h * w) // (cfg.select.patch_size**2)
    results: dict[tuple[str, str, int], list[float]] = {}
    for split in range(args.splits):
        pool, test = protocol_split(len(images), "2023", cfg.eval.test_fraction, split)
        for unit_label in args.units:
            unit = "image" if unit_label == "image" else "patch"
            for k in args.shots:
                budget = k if unit == "image" else (px_patches if unit_label == "patch=px" else per_image) * k
                for method in args.methods:
                    sel = select_support(theta1, images, pool, budget, method, unit, cfg, seed=split,
                                         run_pretext=False, exclude=test)
                    x, y = selection_crops(images, sel, cfg)
                    model, _ = finetune(copy.deepcopy(theta1), x, y, cfg.finetune, seed=split)
                    summary, _ = evaluate(model, images, test)
                    results.setdefault((unit_label, method, k), []).append(100 * summary["miou"])
                    print(f"split {split} {unit_label:<8} K={k} {method:<12} budget {budget:>3} ({sel.annotated_pixels():>6} px, "
                          f"{len(x):>3} crops) mIoU {100 * summary['miou']:.1f}", flush=True)
    print(f"\nmIoU (%) on {args.target}, mean ± std over {args.splits} split(s); {time.perf_counter() - t0:.0f} s")
    for (unit_label, method, k), v in sorted(results.items()):
        print(f"  {unit_label:<8} K={k} {method:<12} {np.mean(v):5.1f} ± {np.std(v):4.1f}")


if __name__ == "__main__":
    main()
