"""How a target's intensity scale moves a benchmark cell: a data root where one prepared data set's
images are rescaled, every other data set linked in unchanged, for ``bench/ablate.py --data-root``.

Two transforms of each image ``x`` (its store values read as [0, 1]), written as float32 so no
8-bit rounding enters:

* ``--scale F``: ``F · x`` — a dim target (a fluorescence camera that fills a quarter of its
  range is ``--scale 0.25``); nothing but the scale differs from the prepared store.
* ``--stretch LO HI``: the image's own LO-th and HI-th percentiles to 0 and 1, clipped — the
  per-image normalisation of Cellpose (1, 99) and StarDist (1, 99.8). It undoes any ``--scale``
  (a scaled image stretches to the same values), so its cells answer whether fsmeta should
  normalise every image this way.
* ``--invert``: ``1 − x`` — dark objects on light become bright objects on dark, a fluorescence-like
  target from real annotated images (the pseudo-labels' polarity, ``select.polarity``).

``--name NEW`` writes the result as data set NEW of kind ``imported`` (a lab's own data set: no
catalogue entry, so fsmeta reads its polarity off the images) and links NAME in too.

    python bench/intensity.py tnbc --root data --out /tmp/dim --scale 0.25
    python bench/intensity.py tnbc --root data --out /tmp/stretch --stretch 1 99.8
    python bench/intensity.py tnbc --root data --out /tmp/inv --invert --name tnbcinv
    python bench/ablate.py --config configs/real3.yaml --data-root /tmp/dim --set threads=1 --target tnbc \\
        --shots 5 --seeds 0 1 2 --checkpoint runs/real3-v8/pretrained/tnbc/fcrn/meta-all/meta.safetensors --variant "dim="

Prints, per store, the median over images of the 1st and 99.8th percentiles and their span.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from colour_channel import link_other_data_sets  # noqa: E402  (bench/, the folder of this script)
from fsmeta.data.store import Record, open_store, read_meta, write_store  # noqa: E402


def unit(image: np.ndarray) -> np.ndarray:
    # x / 255 rather than fsmeta.data.store.to_unit_float's x · (1/255): the two differ in the last
    # bit, and the stores measured in docs/results.md were written this way
    x = np.asarray(image, dtype=np.float32)
    return x / np.float32(255.0) if image.dtype == np.uint8 else x


def transform(image: np.ndarray, scale: float | None, stretch: tuple[float, float] | None, invert: bool = False) -> np.ndarray:
    x = unit(image)
    if invert:
        return (np.float32(1.0) - x).astype(np.float32)
    if scale is not None:
        return (x * np.float32(scale)).astype(np.float32)
    lo, hi = np.percentile(x, stretch)
    if hi <= lo:
        return x.astype(np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def spans(root: Path, name: str) -> str:
    s = open_store(root, name)
    p = np.array([np.percentile(unit(s.images[i]), [1.0, 99.8]) for i in range(len(s))])
    lo, hi = np.median(p[:, 0]), np.median(p[:, 1])
    return f"{name} in {root}: median p1 {lo:.3f}, p99.8 {hi:.3f}, span {np.median(p[:, 1] - p[:, 0]):.3f} ({len(s)} images)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="a prepared data set of --root (e.g. tnbc)")
    p.add_argument("--root", required=True, help="the prepared data root")
    p.add_argument("--out", required=True, help="the new data root (NAME rewritten, the rest linked)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--scale", type=float, help="multiply every image by this factor (0 < F ≤ 1)")
    how.add_argument("--stretch", type=float, nargs=2, metavar=("LO", "HI"), help="per-image percentiles mapped to 0 and 1")
    how.add_argument("--invert", action="store_true", help="1 − x: bright objects on a dark background")
    p.add_argument("--name", dest="new_name", help="write the result as this data set, of kind imported (default: NAME itself)")
    args = p.parse_args(argv)
    if args.scale is not None and not 0.0 < args.scale <= 1.0:
        raise SystemExit(f"--scale must lie in (0, 1], got {args.scale}")
    if args.stretch is not None and not 0.0 <= args.stretch[0] < args.stretch[1] <= 100.0:
        raise SystemExit(f"--stretch needs 0 ≤ LO < HI ≤ 100, got {args.stretch}")
    root, out = Path(args.root).resolve(), Path(args.out)
    meta = read_meta(root, args.name)
    if meta is None:
        raise SystemExit(f"no prepared data set {args.name!r} under {root}")
    name = args.new_name or args.name
    link_other_data_sets(root, out, args.name if name == args.name else "")
    s = open_store(root, args.name)
    records = (Record(s.ids[i], transform(s.images[i], args.scale, args.stretch, args.invert), np.asarray(s.masks[i]), s.splits[i],
                      s.sources[i]) for i in range(len(s)))
    extra = {k: meta[k] for k in ("colour", "colour_reason", "provenance") if k in meta}
    extra["intensity"] = ({"invert": True, "from": args.name} if args.invert else {"scale": args.scale} if args.scale is not None
                          else {"stretch_percentiles": list(args.stretch)})
    write_store(out, name, records, kind=meta["kind"] if name == args.name else "imported", image_dtype="float32", extra_meta=extra)
    print(spans(root, args.name))
    print(spans(out, name))


if __name__ == "__main__":
    main()
