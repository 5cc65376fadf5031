"""Cell outlines as the tools a lab already has read and write them: ImageJ/Fiji ROI sets and QuPath GeoJSON.

One polygon per cell of an instance-label image (labels 1..N, as
:func:`fsmeta.predict.instance_labels` gives): its outer boundary, traced along
the pixel edges by marching squares, in image coordinates where pixel ``(row,
col)`` covers ``[col, col + 1] × [row, row + 1]`` (ImageJ's and QuPath's
convention). Holes inside a cell are not drawn (an ImageJ polygon has none).
The polygon's corners are cut diagonally, so its area is the pixel count less
1/8 px per corner; the GeoJSON carries the exact pixel count as ``area_px``,
the same count as ``counts.csv``'s mean area.

- ``imagej``: ``<stem>.zip`` of ImageJ polygon ROIs (roifile), named
  ``cell-0001``…; for a multi-page stack each ROI carries its page as its stack
  position, so Fiji's ROI Manager shows it on that page.
- ``geojson``: ``<stem>.geojson``, a FeatureCollection of polygons with QuPath's
  ``objectType``/``classification``/``measurements`` properties (File ›
  Import objects in QuPath 0.4+); one file per page for a stack
  (``<stem>-p000.geojson``…, like the overlays).

Reading them back as masks (a lab corrects the outlines in Fiji, then fine-tunes on them):
:mod:`fsmeta.data.annotations`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fsmeta.atomic import atomic_write, atomic_write_bytes
from fsmeta.data.annotations import ANNOTATION_SUFFIXES, _shoelace, fill_shapes, is_annotation, read_annotation
from fsmeta.errors import FsmetaError

ROI_FORMATS = ("imagej", "geojson")


@dataclass(frozen=True)
class CellOutline:
    label: int
    points: np.ndarray  # (n, 2) float64 x, y; open (the first point is not repeated)
    area_px: int


def parse_formats(text: str) -> tuple[str, ...]:
    """``"imagej,geojson"`` → ``("imagej", "geojson")``; an unknown name is a :class:`FsmetaError`."""
    names = tuple(dict.fromkeys(s.strip().lower() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in ROI_FORMATS]
    if unknown or not names:
        raise FsmetaError(f"--rois {text!r}: choose one or more of {', '.join(ROI_FORMATS)}, comma-separated")
    return names


def cell_outlines(labels: np.ndarray) -> list[CellOutline]:
    """One outline per label 1..N of ``labels`` (H, W), in label order.

    A cell in several 8-connected pieces (rare after a watershed) keeps the
    outline of its largest piece, so there is still exactly one polygon per cell.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    outlines: list[CellOutline] = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:  # a label without pixels: the labels are not 1..N
            raise ValueError(f"label {k} has no pixels; instance labels must be 1..N")
        outlines.append(CellOutline(k, outline_points(labels[box] == k, box[0].start, box[1].start), int(areas[k])))
    return outlines


def outline_points(cell: np.ndarray, y0: int, x0: int) -> np.ndarray:
    """(n, 2) x, y of the outer boundary of the largest piece of ``cell`` (a boolean window whose
    top-left pixel is image pixel (y0, x0)), on the pixel edges."""
    from skimage.measure import find_contours

    padded = np.pad(cell, 1).astype(np.float32)
    # 'high': diagonal neighbours of a cell join, as in the 8-connected labelling.
    best = max(find_contours(padded, 0.5, fully_connected="high"), key=_shoelace)
    # Contour (row, col) in padded pixel-centre coordinates → image x, y on pixel edges.
    xy = np.stack([best[:, 1] + x0 - 0.5, best[:, 0] + y0 - 0.5], axis=1)
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    return xy


def write_imagej(path: str | Path, pages: Sequence[list[CellOutline]]) -> Path:
    """An ImageJ ROI set (zip) of polygon ROIs; with several pages each ROI carries its stack position."""
    import roifile

    rois = []
    for page, outlines in enumerate(pages):
        for c in outlines:
            roi = roifile.ImagejRoi.frompoints(c.points, name=f"cell-{c.label:04d}" + (f"-p{page:03d}" if len(pages) > 1 else ""),
                                               position=page if len(pages) > 1 else None)
            roi.roitype = roifile.ROI_TYPE.POLYGON
            rois.append(roi)
    path = Path(path)
    if not rois:  # roifile writes no zip for an empty set; an empty zip tells Fiji there are no cells
        import zipfile

        return atomic_write(path, lambda tmp: zipfile.ZipFile(tmp, "w").close())
    return atomic_write(path, lambda tmp: roifile.roiwrite(tmp, rois, mode="w"))


def geojson(outlines: list[CellOutline], image_name: str = "") -> dict:
    """A QuPath-style GeoJSON FeatureCollection: one detection polygon per cell, with its area."""
    features = []
    for c in outlines:
        ring = [[round(float(x), 3), round(float(y), 3)] for x, y in c.points]
        ring.append(ring[0])
        features.append({
            "type": "Feature",
            "id": f"cell-{c.label:04d}",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "name": f"cell-{c.label:04d}",
                "classification": {"name": "Cell"},
                "label": c.label,
                "area_px": c.area_px,
                "measurements": {"Area px^2": c.area_px},
                **({"image": image_name} if image_name else {}),
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, outlines: list[CellOutline], image_name: str = "") -> Path:
    data = (json.dumps(geojson(outlines, image_name), separators=(",", ":")) + "\n").encode()
    return atomic_write_bytes(path, data)


def write_rois(folder: str | Path, stem: str, labels_pages: Sequence[np.ndarray], formats: Sequence[str],
               image_name: str = "") -> list[Path]:
    """Write the ROI files of one input (one or more label pages) under ``folder``; returns the paths."""
    if not formats:
        return []
    folder = Path(folder)
    pages = [cell_outlines(lab) for lab in labels_pages]
    written = []
    if "imagej" in formats:
        written.append(write_imagej(folder / f"{stem}.zip", pages))
    if "geojson" in formats:
        for k, outlines in enumerate(pages):
            suffix = f"-p{k:03d}" if len(pages) > 1 else ""
            written.append(write_geojson(folder / f"{stem}{suffix}.geojson", outlines, image_name))
    return written


__all__ = ["ROI_FORMATS", "ANNOTATION_SUFFIXES", "CellOutline", "parse_formats", "cell_outlines", "outline_points",
           "write_imagej", "geojson", "write_geojson", "write_rois", "is_annotation", "read_annotation", "fill_shapes"]
