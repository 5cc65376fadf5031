"""Peak memory of `fsmeta predict` on a generated huge image: streamed (fsmeta.large) against in memory.

Writes a SIDE×SIDE 8-bit tiled BigTIFF of synthetic cells tile by tile (never the
whole image in memory), then runs each path in a fresh process and reports its
peak resident memory (``ru_maxrss``) and wall time. The model is a stand-in that
thresholds brightness (a 1-parameter network): the arrays of the pipeline are what
is measured, and a real network adds the same batch activations to both paths.

    python bench/huge_image.py                       # 20000², both paths
    python bench/huge_image.py --side 8000 --paths streamed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 512


def write_slide(path: Path, side: int) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:TILE, :TILE]
    patterns = []
    for _ in range(8):
        t = np.full((TILE, TILE), 30, np.uint8)
        for _ in range(25):
            cy, cx, r = rng.integers(0, TILE), rng.integers(0, TILE), rng.integers(4, 20)
            t[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 200
        patterns.append(t)
    n = -(-side // TILE)
    tiles = (patterns[(i * 7 + j) % len(patterns)] for i in range(n) for j in range(n))
    tifffile.imwrite(path, tiles, shape=(side, side), dtype=np.uint8, tile=(TILE, TILE), bigtiff=True,
                     photometric="minisblack", compression="zlib")


CHILD = r"""
import json, resource, sys, time
import torch
from pathlib import Path
import fsmeta.large as large
from fsmeta.predict import PredictSettings, predict_files

class Brightness(torch.nn.Module):
    stride = 8
    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(20.0))
    def forward(self, x):
        return self.gain * x

path, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
settings = PredictSettings(tile=512, overlap=64, batch=4)
t0 = time.perf_counter()
if mode == "streamed":
    large.LARGE_PIXELS = 0  # stream whatever the side, so small sides compare too
    rows = large.predict_inputs(Brightness(), [path], out, settings, progress=False)
else:
    rows = predict_files(Brightness(), [path], out, settings, progress=False)  # today's path: the image in memory
print(json.dumps({"cells": rows[0].cells, "seconds": time.perf_counter() - t0,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=20000, help="image side in pixels (default: 20000)")
    ap.add_argument("--paths", default="streamed,memory", help="which paths to run (default: streamed,memory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fsmeta-huge-") as tmp:
        slide = Path(tmp) / "slide.tif"
        t0 = time.perf_counter()
        write_slide(slide, args.side)
        print(f"{args.side}×{args.side} uint8 BigTIFF: {slide.stat().st_size / 2**20:.0f} MiB on disk, "
              f"written in {time.perf_counter() - t0:.0f} s", flush=True)
        for mode in args.paths.split(","):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(Path(tmp) / mode), mode],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{mode}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{mode:>8}: peak RSS {r['peak_mib']:,.0f} MiB, {r['seconds']:.0f} s, {r['cells']:,} cells", flush=True)


if __name__ == "__main__":
    main()
