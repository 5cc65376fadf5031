"""Which single channel of an RGB brightfield data set carries its cells: luminance grey (fsmeta's
reading of colour) against the haematoxylin stain alone, from colour deconvolution (Ruifrok &
Johnston, Anal. Quant. Cytol. Histol. 2001; ``skimage.color.rgb2hed``), for issue 19's colour lever.

Two things, both from a public data set's own files:

1. **Separability per pixel**: over every image, the AUC of the pixel intensity as a score of
   foreground against background (read from the masks: a diagnostic, never an input to a
   model), and Fisher's ratio (difference of the class means)² / (sum of the class variances),
   for the grey reading and for the haematoxylin-only rendering (the H concentration put back
   through ``hed2rgb`` with no eosin and no DAB, then to grey by the same luminance, so nuclei stay
   dark on a light background and the polarity is grey's). An AUC of 0.5 is no signal; both
   directions count (``max(AUC, 1 − AUC)``).
2. With ``--out DIR``: a data root where the data set is prepared from the haematoxylin-only
   rendering (``fsmeta.data.prepare`` with ``colour="haematoxylin"``), every other data set of
   ``--root`` linked in unchanged, so ``bench/ablate.py --data-root DIR`` runs benchmark cells on it
   beside the grey cells of a recorded run (same θ′, splits and seeds).

    python bench/colour_channel.py tnbc --from ../shared/data/TNBC_NucleiSegmentation --root data --out /tmp/hroot
    python bench/ablate.py --config configs/real3.yaml --data-root /tmp/hroot --target tnbc --shots 1 3 5 7 10 \\
        --seeds 0 1 2 --checkpoint runs/real3-v7/pretrained/tnbc/fcrn/meta-all/meta.safetensors --variant "haematoxylin="
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import fsmeta.data.prepare as prepare_module  # noqa: E402
from fsmeta.data.colour import haematoxylin_grey  # noqa: E402
from fsmeta.data.io import to_grey  # noqa: E402


def auc(fg: np.ndarray, bg: np.ndarray) -> float:
    """P(a foreground value > a background value) + ½ P(tie), from 8-bit histograms (exact)."""
    hf = np.bincount(fg.ravel(), minlength=256).astype(np.float64)
    hb = np.bincount(bg.ravel(), minlength=256).astype(np.float64)
    below = np.concatenate([[0.0], np.cumsum(hb)[:-1]])  # background values strictly below each level
    return float((hf * (below + 0.5 * hb)).sum() / (hf.sum() * hb.sum()))


def fisher(fg: np.ndarray, bg: np.ndarray) -> float:
    f, b = fg.astype(np.float64), bg.astype(np.float64)
    return float((f.mean() - b.mean()) ** 2 / (f.var() + b.var()))


def separability(name: str, source: Path) -> None:
    spec = prepare_module.PUBLIC[name]
    where, items = prepare_module.READERS[name](source, spec)
    rows = {"grey": ([], []), "haematoxylin": ([], [])}
    per_image = {"grey": [], "haematoxylin": []}
    for item in items:
        raw = prepare_module.read_image(item.image)
        mask = prepare_module._binary_public(prepare_module.read_image(item.mask)).astype(bool)
        if raw.ndim != 3 or not mask.any() or mask.all():
            continue
        for label, image in (("grey", to_grey(raw)), ("haematoxylin", haematoxylin_grey(raw))):
            rows[label][0].append(image[mask])
            rows[label][1].append(image[~mask])
            a = auc(image[mask], image[~mask])
            per_image[label].append(max(a, 1 - a))
    n = len(per_image["grey"])
    if not n:
        raise SystemExit(f"{name}: no RGB image with both foreground and background; nothing to compare")
    print(f"{name}: {n} RGB images with foreground and background, {len(items)} in all")
    print("channel        pooled AUC  Fisher  per-image AUC (mean, min)  fg mean  bg mean")
    for label, (fg, bg) in rows.items():
        f, b = np.concatenate(fg), np.concatenate(bg)
        a = auc(f, b)
        print(f"{label:<14} {max(a, 1 - a):10.3f}  {fisher(f, b):6.3f}  {np.mean(per_image[label]):10.3f} {np.min(per_image[label]):6.3f}"
              f"       {f.mean():7.1f}  {b.mean():7.1f}")


def link_other_data_sets(root: Path, out: Path, name: str) -> None:
    """Make ``out`` a data root holding every data set of ``root`` but ``name``, as symbolic links."""
    out.mkdir(parents=True, exist_ok=True)
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name != name and not d.name.startswith(".") and not (out / d.name).exists():
            os.symlink(d, out / d.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="a public RGB data set of fsmeta.data.prepare (e.g. tnbc)")
    p.add_argument("--from", dest="source", required=True, help="its unpacked download")
    p.add_argument("--root", help="the prepared data root whose other data sets --out links to")
    p.add_argument("--out", help="write a data root with NAME prepared from the haematoxylin channel")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    separability(args.name, Path(args.source))
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.out:
        if not args.root:
            raise SystemExit("--out needs --root (the data root whose other data sets it links)")
        out = Path(args.out)
        link_other_data_sets(Path(args.root).resolve(), out, args.name)
        store = prepare_module.prepare(args.name, out, args.source, progress=False, colour="haematoxylin")
        print(f"{args.name} prepared from the haematoxylin channel: {store}")


if __name__ == "__main__":
    main()
