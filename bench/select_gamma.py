"""How good are the pretext pseudo-labels? Fixed γ vs ``--gamma auto`` vs k-means.

For each data set: mean IoU (and foreground fraction) of the pseudo-label of
every image against its true mask, for the configured γ, a grid of γ, the
``auto`` rule (Otsu on the intensities, on the equalised scale), the literal
"Otsu on the equalised image", and k-means. The pseudo-labels never see a mask;
the masks only score them here.

    python bench/select_gamma.py                       # the five synthetic domains
    python bench/select_gamma.py --data-root DATA --datasets tnbc em sstem   # prepared real data sets
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--seed", type=int, default=0, help="synthetic generator seed (default: 0; the γ table was read off seed 0)")
    ap.add_argument("--data-root", metavar="DIR", help="prepared data sets (default: none, synthetic only)")
    ap.add_argument("--datasets", nargs="*", default=["tnbc", "em", "sstem", "b5", "b39"], metavar="NAME",
                    help="prepared data sets to measure if present (default: tnbc em sstem b5 b39)")
    ap.add_argument("--max-images", type=int, default=40, help="evenly spaced images per real data set (default: 40)")
    args = ap.parse_args()
    cfg = SelectConfig()
    for d in synth.DOMAINS:
        imgs, masks = synth.generate(d, args.images, args.size, seed=args.seed)
        measure(d, list(imgs), list(masks), cfg)
    if args.data_root:
        from fsmeta.data.store import open_store, read_meta

        for name in args.datasets:
            if read_meta(args.data_root, name) is None:
                print(f"\n{name}: not prepared under {args.data_root}, skipped")
                continue
            ds = open_store(args.data_root, name)
            picks = np.linspace(0, len(ds) - 1, min(args.max_images, len(ds))).round().astype(int)
            measure(name, [ds.image(int(i)) for i in picks], [ds.masks[int(i)] for i in picks], cfg)

if __name__ == "__main__":
    main()
