"""What a lab waits for: ``fsmeta finetune`` on a folder of its own annotated images, with the
built-in defaults (issue 19: ≤ 3 minutes for 5 images of about 1 MPx on 2 CPU cores, and a
progress line at least every 10 s).

Writes ``--images`` image/mask pairs of a prepared data set (default: the first five EM images,
1024×768) into two folders as TIFF, runs the real command line in a subprocess —

    fsmeta finetune --weights W --support-images DIR --support-masks DIR --out OUT --no-tracking

— and prints its wall time, the number of crops it trained on, and the longest silence between
two lines of its output (start-up included). Without ``--weights`` a freshly initialised FCRN is
saved and fine-tuned (the cost does not depend on the weights).

    python bench/user_finetune.py --data-root ../data --dataset em --weights runs/real3/pretrained/em/fcrn/meta-all/meta.safetensors
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="prepared data sets")
    p.add_argument("--dataset", default="em")
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--weights", help="a pre-trained checkpoint (default: a freshly initialised FCRN)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for fsmeta finetune")
    args = p.parse_args(argv)

    from fsmeta.checkpoint import save_checkpoint
    from fsmeta.config import load_config
    from fsmeta.data.registry import load_dataset
    from fsmeta.train import initial_theta

    cfg = load_config(None, [f"data.root={args.data_root}", f"data.target={args.dataset}", "data.sources=[synth-em]"])
    ds = load_dataset(args.dataset, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        pixels = 0
        for i in range(args.images):
            image = np.asarray(ds.images[i])
            tifffile.imwrite(tmp / "images" / f"{ds.ids[i]}.tif", image)
            tifffile.imwrite(tmp / "masks" / f"{ds.ids[i]}.tif", (np.asarray(ds.masks[i]) > 0).astype(np.uint8) * 255)
            pixels += int(ds.masks[i].size)
        weights = args.weights
        if not weights:
            weights = str(save_checkpoint(tmp / "init.safetensors", initial_theta("fcrn", 0),
                                          {"arch": "fcrn", "kind": "scratch", "bn_affine": False}))
        cmd = [sys.executable, "-m", "fsmeta.cli", "finetune", "--weights", weights, "--support-images", str(tmp / "images"),
               "--support-masks", str(tmp / "masks"), "--out", str(tmp / "out.safetensors"), "--no-tracking",
               "--threads", str(args.threads), *[a for o in args.overrides for a in ("--set", o)]]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        t0 = time.perf_counter()
        last, longest, lines = t0, 0.0, []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                now = time.perf_counter()
                longest = max(longest, now - last)
                last = now
                lines.append(line.rstrip())
        wall = time.perf_counter() - t0
        if proc.returncode:
            print("\n".join(lines[-20:]))
            raise SystemExit(f"fsmeta finetune exited {proc.returncode}")
    print(lines[-1])
    print(f"{args.images} image(s) of {args.dataset}, {pixels / 1e6:.2f} MPx in all: wall {wall:.1f} s, "
          f"{len(lines)} output lines, longest silence {longest:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
