"""Coverage's memory bound, measured: the greedy facility-location order on a synthetic pool
with its similarity table kept (the default up to ``COVERAGE_MEMORY``) against the bounded
path (every row recomputed when needed, blocks of ``COVERAGE_CHUNK`` patches), in one run.

Prints peak traced memory (numpy's allocations, via tracemalloc), seconds, their ratios, and
whether the two orders are equal.

    python bench/coverage_memory.py --patches 20000 --candidates 20000   # the patch unit
    python bench/coverage_memory.py --patches 20000 --candidates 100     # the image unit
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from fsmeta.select import diversity  # noqa: E402


def run(features, owners, share, n, memory):
    diversity.COVERAGE_MEMORY = memory
    tracemalloc.start()
    t0 = time.perf_counter()
    order = diversity.coverage_order(features, owners, share, n, seed=0, min_foreground=0.05)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return order, seconds, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patches", type=int, default=20000)
    p.add_argument("--candidates", type=int, default=20000, help="= --patches for the patch unit")
    p.add_argument("--dim", type=int, default=512, help="feature channels (FCRN's bottleneck: 512)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(args.patches, args.dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    owners = np.arange(args.patches) % args.candidates
    share = rng.random(args.patches) * 0.2
    default = diversity.COVERAGE_MEMORY
    kept = run(feats, owners, share, args.candidates, 2**62)
    bounded = run(feats, owners, share, args.candidates, 0)
    diversity.COVERAGE_MEMORY = default
    print(f"{args.patches} patches, {args.candidates} candidates, {args.dim} channels")
    for name, (_, s, peak) in (("table kept", kept), ("bounded", bounded)):
        print(f"  {name:<11} {s:7.2f} s  peak {peak / 2**20:8.1f} MiB")
    print(f"  bounded / kept: time {bounded[1] / kept[1]:.2f}×, peak memory {bounded[2] / kept[2]:.3f}×; "
          f"same order: {np.array_equal(kept[0], bounded[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
