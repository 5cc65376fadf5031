"""How good are the pretext pseudo-labels? Fixed γ vs ``--gamma auto`` vs k-means.

For each data set: mean IoU (and foreground fraction) of the pseudo-label of
every image against its true mask, for the configured γ, a grid of γ, the
``auto`` rule (Otsu on the intensities, on the equalised scale), the literal
"Otsu on the equalised image", and k-means. The pseudo-labels never see a mask;
the masks only score them here.

    python bench/select_gamma.py                       # the five synthetic domains
    python bench/select_gamma.py --em ../shared/data/EM_Hippocampus --em-slices 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from skimage import filters

from fsmeta.config import SelectConfig
from fsmeta.data import synth
from fsmeta.select.pseudo import auto_gamma, equalise, pseudo_label

GRID = (0.05, 0.1, 0.15, 0.25, 0.4, 0.55)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return (np.count_nonzero(a & b) + 1e-4) / (np.count_nonzero(a | b) + 1e-4)


def measure(name: str, images: list[np.ndarray], masks: list[np.ndarray], cfg: SelectConfig) -> None:
    pol = cfg.lookup("polarity", name)
    fixed = float(cfg.lookup("gamma", name))
    rows: dict[str, list[float]] = {}
    gammas = []
    for img, m in zip(images, masks):
        rows.setdefault(f"fixed γ={fixed:.2f}", []).append(iou(pseudo_label(img, fixed, polarity=pol), m))
        g = auto_gamma(img, pol)
        gammas.append(g)
        rows.setdefault("auto", []).append(iou(pseudo_label(img, g, polarity=pol), m))
        x = 1.0 - img if pol == "bright" else img
        g_eq = float(filters.threshold_otsu(equalise(x)))
        rows.setdefault("otsu-on-equalised", []).append(iou(pseudo_label(img, g_eq, polarity=pol), m))
        rows.setdefault("kmeans", []).append(iou(pseudo_label(img, polarity=pol, method="kmeans"), m))
        for gg in GRID:
            rows.setdefault(f"γ={gg:.2f}", []).append(iou(pseudo_label(img, gg, polarity=pol), m))
    fg = np.mean([m.mean() for m in masks])
    print(f"\n{name} ({len(images)} images, polarity {pol}, true foreground {100 * fg:.1f}%, auto γ {np.mean(gammas):.2f} ± {np.std(gammas):.2f})")
    for k, v in rows.items():
        print(f"  {k:<20} IoU {100 * np.mean(v):5.1f} ± {100 * np.std(v):4.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20, help="images per synthetic domain (default: 20)")
    ap.add_argument("--size", type=int, default=256, help="synthetic image side (default: 256)")
    ap.add_argument("--em", metavar="DIR", help="EM_Hippocampus folder with training.tif and training_groundtruth.tif (default: skip)")
    ap.add_argument("--em-slices", type=int, default=20, help="EM slices, evenly spaced (default: 20)")
    args = ap.parse_args()
    cfg = SelectConfig()
    for d in synth.DOMAINS:
        imgs, masks = synth.generate(d, args.images, args.size, seed=0)
        measure(d, list(imgs), list(masks), cfg)
    if args.em:
        import tifffile

        folder = Path(args.em)
        with tifffile.TiffFile(folder / "training.tif") as ti, tifffile.TiffFile(folder / "training_groundtruth.tif") as tg:
            picks = np.linspace(0, len(ti.pages) - 1, args.em_slices).round().astype(int)
            imgs = [ti.pages[i].asarray().astype(np.float32) / 255.0 for i in picks]
            masks = [(tg.pages[i].asarray() > 127).astype(np.uint8) for i in picks]
        measure("em", imgs, masks, cfg)


if __name__ == "__main__":
    main()
