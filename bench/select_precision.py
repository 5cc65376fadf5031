"""Does bf16 change what selection picks? Rankings of one target's patches scored in fp32 and in
bf16 autocast (+ channels_last) from the same θ′: Spearman correlation of the scores and the
overlap of the top-B selections, per method.

    python bench/select_precision.py --config configs/real3.yaml --data-root ../data \\
        --weights runs/real3/pretrained/tnbc/fcrn/meta-all/pretext.safetensors --target tnbc --budgets 25 250
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from fsmeta.checkpoint import model_from_checkpoint  # noqa: E402
from fsmeta.config import ComputeConfig, load_config  # noqa: E402
from fsmeta.data.registry import load_dataset  # noqa: E402
from fsmeta.select import select_support  # noqa: E402
from fsmeta.train import apply_threads  # noqa: E402


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data-root")
    p.add_argument("--weights", required=True, help="θ′ (a benchmark's pretext.safetensors) or any pre-trained checkpoint")
    p.add_argument("--target", required=True)
    p.add_argument("--methods", nargs="+", default=["entropy", "mc-dropout", "consistency"])
    p.add_argument("--budgets", type=int, nargs="+", default=[25, 250])
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"data.root={args.data_root}"] if args.data_root else [])
    apply_threads(cfg)
    images = load_dataset(args.target, cfg)
    pool = np.arange(len(images))
    print(f"{args.target}: {len(images)} images, patches {cfg.select.patch_size}² (unit {cfg.select.unit}); weights {args.weights}")
    print(f"{'method':<13}{'items':>7}{'Spearman':>10}" + "".join(f"{'top-' + str(b) + ' overlap':>17}" for b in args.budgets)
          + f"{'fp32 s':>8}{'bf16 s':>8}")
    for method in args.methods:
        scores, seconds = {}, {}
        for name, compute in (("fp32", ComputeConfig(amp="off", channels_last="off")), ("bf16", ComputeConfig(amp="bf16", channels_last="on"))):
            model, _ = model_from_checkpoint(args.weights)
            c = dataclasses.replace(cfg, compute=compute)
            t0 = time.perf_counter()
            sel = select_support(model, images, pool, max(args.budgets), method, cfg.select.unit, c, seed=0, run_pretext=False)
            seconds[name] = time.perf_counter() - t0
            scores[name] = {(it.image, it.y, it.x): it.score for it in sel.ranking}
        keys = sorted(scores["fp32"])
        a = np.array([scores["fp32"][k] for k in keys])
        b = np.array([scores["bf16"][k] for k in keys])
        rho = float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
        overlaps = []
        for budget in args.budgets:
            top_a = {keys[i] for i in np.argsort(-a, kind="stable")[:budget]}
            top_b = {keys[i] for i in np.argsort(-b, kind="stable")[:budget]}
            overlaps.append(len(top_a & top_b) / budget)
        print(f"{method:<13}{len(keys):>7}{rho:>10.4f}" + "".join(f"{100 * o:>16.1f}%" for o in overlaps)
              + f"{seconds['fp32']:>8.0f}{seconds['bf16']:>8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
