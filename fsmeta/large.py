"""Images larger than memory: OME-TIFF/BigTIFF and OME-Zarr read window by window, masks and
labels written as OME-Zarr, memory bounded by a band of tiles instead of the image.

:func:`fsmeta.predict.predict_files` sends an input here when it is an OME-Zarr
folder (``*.zarr``) or a TIFF of more than :data:`LARGE_PIXELS` pixels. The
probabilities are those of :func:`fsmeta.predict.predict_tiled` (same tiles,
same weights; equal to float rounding, as tiles are batched differently),
computed one row of tiles at a time: the rows no later tile touches are final, become mask rows and are
labelled at once. Cells that cross from one band into the next are joined by a
union–find over the seam (8-connected, as :func:`~fsmeta.predict.instance_labels`),
and a second pass writes the final labels 1..N in order of first appearance, as
the in-memory path numbers them. Peak memory is a few arrays of one band (tile
height × image width) plus the model's batch, whatever the image height.

Outputs: ``masks/<name>`` (uint8 0/255) and ``labels/<name>`` (uint32), for a
TIFF input as tiled BigTIFF (``.tif``), for an OME-Zarr input as OME-NGFF 0.4
single-scale images (``.ome.zarr``, zarr format 2, chunks of the tile size);
``output`` chooses either. And the image's row in ``counts.csv``, and with
``--rois`` the same ROI files as :mod:`fsmeta.rois` writes (each cell traced from
its own bounding-box window). A streamed image gets no overlay (it would be the
size of the image); ``--watershed`` needs the whole mask and is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsmeta.data.crops import normalise
from fsmeta.data.io import to_grey
from fsmeta.errors import DataError, FsmetaError
from fsmeta.models import SegmentationModel
from fsmeta.progress import Progress

log = logging.getLogger(__name__)

LARGE_PIXELS = 8192 * 8192  # a TIFF with more pixels than this is streamed (one 8-bit copy: 64 MiB)
ZARR_SUFFIX = ".zarr"
NGFF_VERSION = "0.4"
OUTPUTS = ("auto", "ome-zarr", "bigtiff")


def is_large(path: str | Path) -> bool:
    """True for an OME-Zarr folder, or a TIFF whose first series has more than LARGE_PIXELS pixels."""
    path = Path(path)
    if path.suffix.lower() == ZARR_SUFFIX:
        return True
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            h, w = (series.shape[series.axes.index(a)] for a in "YX")
    except Exception:  # unreadable or not a 2-D image: the in-memory reader names the problem
        return False
    return h * w > LARGE_PIXELS


# ---------------------------------------------------------------- reading


@dataclass
class LazyImage:
    """A 2-D image (grey or with ≤ 4 colour samples) read window by window from a zarr array."""

    array: Any  # zarr.Array
    index: tuple  # per stored axis: an int (a singleton or the first page) or None (y, x, channel)
    channel_axis: int | None  # which stored axis holds colour samples, or None
    y_axis: int
    x_axis: int
    where: str
    handle: Any = None  # the open TiffFile behind a TIFF's zarr store, closed by close()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[self.y_axis]), int(self.array.shape[self.x_axis])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] as (h, w) or (h, w, C), as stored."""
        key = []
        for axis, fixed in enumerate(self.index):
            if axis == self.y_axis:
                key.append(slice(y0, y1))
            elif axis == self.x_axis:
                key.append(slice(x0, x1))
            elif fixed is None:
                key.append(slice(None))
            else:
                key.append(fixed)
        data = np.asarray(self.array[tuple(key)])
        kept = [a for a, f in enumerate(self.index) if f is None or a in (self.y_axis, self.x_axis)]
        order = [kept.index(self.y_axis), kept.index(self.x_axis)] + ([kept.index(self.channel_axis)] if self.channel_axis is not None else [])
        return np.transpose(data, order)


def open_lazy(path: str | Path) -> LazyImage:
    """An OME-Zarr folder (NGFF 0.4 or 0.5, its full-resolution level) or a TIFF (its first series,
    level 0, through tifffile's zarr store), opened without reading the pixels."""
    import zarr

    path = Path(path)
    tif = None
    try:
        if path.suffix.lower() == ZARR_SUFFIX:
            node = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Array):
                array, axes = node, "yx" if node.ndim == 2 else "cyx"[-node.ndim:]
            else:
                attrs = dict(node.attrs)
                multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
                if not multiscales:
                    raise DataError(f"{path} is a zarr group without OME-NGFF multiscales metadata")
                ms = multiscales[0]
                array = node[ms["datasets"][0]["path"]]
                axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", "tczyx"[-array.ndim:]))
        else:
            import tifffile

            tif = tifffile.TiffFile(path)
            series = tif.series[0]
            store = series.aszarr(level=0)
            node = zarr.open(store, mode="r")
            array = node if isinstance(node, zarr.Array) else node["0"]
            axes = series.axes.lower()
    except DataError:
        raise
    except Exception as exc:  # zarr, tifffile and JSON errors all mean the same to a user
        if tif is not None:
            tif.close()
        raise DataError(f"{path} is not a readable OME-Zarr or TIFF image: {exc}") from None
    axes = axes.lower()
    if len(axes) != array.ndim or "y" not in axes or "x" not in axes:
        raise DataError(f"{path} has axes {axes!r} for a {array.ndim}-D array; expected y and x")
    index: list[int | None] = []
    channel = None
    for axis, name in enumerate(axes):
        n = int(array.shape[axis])
        if name in "yx":
            index.append(None)
        elif name in "cs" and n in (2, 3, 4) and channel is None:
            index.append(None)
            channel = axis
        elif n == 1:
            index.append(0)
        else:
            if tif is not None:
                tif.close()
            raise DataError(f"{path} has {n} planes along axis {name!r}; a streamed image must be one 2-D plane "
                            "(grey or RGB); split the stack first")
    return LazyImage(array, tuple(index), channel, axes.index("y"), axes.index("x"), str(path), tif)


def _value_range(image: LazyImage, band: int, colour: str = "grey") -> tuple[float, float]:
    """Min and max of the grey image, band by band (the scaling of a non-8-bit image to [0, 1])."""
    lo, hi = np.inf, -np.inf
    h, w = image.shape
    for y0 in range(0, h, band):
        grey = to_grey(image.read(y0, min(h, y0 + band), 0, w), colour, image.where).astype(np.float64)
        if not np.isfinite(grey).all():
            raise DataError(f"{image.where} has NaN or infinite pixel values")
        lo, hi = min(lo, float(grey.min())), max(hi, float(grey.max()))
    return lo, hi


# ---------------------------------------------------------------- writing


def _create_ngff(folder: Path, name: str, shape: tuple[int, int], dtype, chunk: int, label: bool):
    """An empty single-scale OME-NGFF 0.4 image (zarr format 2) at ``folder``; returns its level-0 array."""
    import zarr

    group = zarr.open_group(str(folder), mode="w", zarr_format=2)
    chunks = (min(chunk, shape[0]), min(chunk, shape[1]))
    # NGFF 0.4 names chunks "y/x" (the "/" separator of zarr format 2).
    array = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                               chunk_key_encoding={"name": "v2", "separator": "/"})
    group.attrs["multiscales"] = [{
        "version": NGFF_VERSION, "name": name,
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}],
    }]
    if label:
        group.attrs["image-label"] = {"version": NGFF_VERSION}
    return array


def _write_bigtiff(path: Path, array, tile: int) -> Path:
    """A tiled, zlib-compressed BigTIFF of a zarr array, written tile by tile (atomically)."""
    import tifffile

    from fsmeta.atomic import atomic_write

    h, w = array.shape

    def tiles():
        for y0 in range(0, h, tile):
            band = np.asarray(array[y0: y0 + tile])  # one row of tiles in memory
            for x0 in range(0, w, tile):
                yield band[:, x0: x0 + tile]

    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, tiles(), shape=(h, w), dtype=array.dtype, tile=(tile, tile),
                                                           bigtiff=True, compression="zlib", photometric="minisblack"))


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


# ---------------------------------------------------------------- prediction


class _Seams:
    """Provisional labels of each band, joined across band seams by union–find."""

    def __init__(self) -> None:
        self.parent = np.zeros(1, np.int64)  # label 0 is background
        self.area = np.zeros(1, np.int64)

    def add(self, n: int, areas: np.ndarray) -> int:
        first = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(first, first + n, dtype=np.int64)])
        self.area = np.concatenate([self.area, areas.astype(np.int64)])
        return first

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = int(self.parent[a])
        return a

    def join(self, above: np.ndarray, below: np.ndarray) -> None:
        """Union the labels of two adjacent rows wherever they touch (8-connected)."""
        w = len(above)
        pairs = []
        for dx in (-1, 0, 1):
            a = above[max(0, dx): w + min(0, dx)]
            b = below[max(0, -dx): w + min(0, -dx)]
            both = (a > 0) & (b > 0)
            pairs.append(np.stack([a[both], b[both]], axis=1))
        for a, b in np.unique(np.concatenate(pairs), axis=0):
            ra, rb = self.find(int(a)), self.find(int(b))
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        roots = self.parent.copy()
        while True:
            nxt = roots[roots]
            if np.array_equal(nxt, roots):
                return roots
            roots = nxt


@torch.no_grad()
def predict_large(model: SegmentationModel, path: str | Path, out: str | Path, settings, progress: bool = True,
                  output: str = "auto"):
    """Segment one large image band by band; write its masks and labels under ``out``; return its
    :class:`~fsmeta.predict.ImageResult` (the row of counts.csv).

    ``output``: ``ome-zarr``, ``bigtiff``, or ``auto`` (BigTIFF for TIFF input, OME-Zarr for OME-Zarr).
    """
    from scipy import ndimage

    from fsmeta.predict import RECEPTIVE_MARGIN, ImageResult, _probability, _ramp, tile_layout

    if settings.watershed:
        raise FsmetaError(f"{path}: --watershed needs the whole mask in memory; a streamed image "
                          f"(OME-Zarr, or a TIFF above {LARGE_PIXELS:,} pixels) is labelled without it")
    if settings.rois:
        log.info("%s is streamed: ROI files are written, no overlay", path)
    path, out = Path(path), Path(out)
    if output not in OUTPUTS:
        raise FsmetaError(f"--large-output {output!r}: choose one of {', '.join(OUTPUTS)}")
    if output == "auto":
        output = "ome-zarr" if path.suffix.lower() == ZARR_SUFFIX else "bigtiff"
    image = open_lazy(path)
    if settings.colour != "grey":  # before any output exists: the model reads the haematoxylin stain of RGB pixels
        channels = 1 if image.channel_axis is None else int(image.array.shape[image.channel_axis])
        if channels < 3:
            image.close()
            raise DataError(f"{image.where} is single-channel; the model reads the {settings.colour} channel of RGB "
                            "images (its checkpoint's colour)")
    h, w = image.shape
    model.eval()
    stride = int(getattr(model, "stride", 8))
    tile = max(2 * stride, (settings.tile // stride) * stride)
    overlap = settings.overlap
    margin = min(RECEPTIVE_MARGIN, overlap // 2)
    ramp = max(overlap - 2 * margin, 0)
    (ys, ty), (xs, tx) = tile_layout(h, tile, overlap, stride), tile_layout(w, tile, overlap, stride)
    rows_of = [(y0, h if i == len(ys) - 1 else y0 + ty) for i, y0 in enumerate(ys)]
    cols_of = [(x0, w if j == len(xs) - 1 else x0 + tx) for j, x0 in enumerate(xs)]
    band_h = max(y1 - y0 for y0, y1 in rows_of)
    try:
        scale = None if image.dtype == np.uint8 else _value_range(image, band_h, settings.colour)  # other depths: by their own range, as in memory
    except BaseException:
        image.close()
        raise

    def unit(pixels: np.ndarray) -> np.ndarray:
        grey = to_grey(pixels, settings.colour, image.where)
        if grey.dtype == np.uint8:
            return grey.astype(np.float32) * np.float32(1 / 255)
        lo, hi = scale
        if hi <= lo:
            return np.zeros(grey.shape, np.float32)
        return ((grey.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)

    stem = _stem(path)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".tmp", dir=out))  # provisional labels, removed at the end
    try:
        provisional = _create_ngff(work / "provisional.zarr", stem, (h, w), np.int64, tile, label=True)
        seams = _Seams()
        acc = np.zeros((band_h, w), np.float32)
        norm = np.zeros((band_h, w), np.float32)
        base = 0
        last_row: np.ndarray | None = None
        bar = Progress(2 * len(rows_of), f"predict {path.name} ({w}×{h}, streamed)", enabled=progress)

        def finish(upto: int) -> None:
            """Rows [base, upto) are final: threshold, label, write provisional labels, shift the band."""
            nonlocal base, last_row
            n_rows = upto - base
            if n_rows <= 0:
                return
            if not (norm[:n_rows] > 0).all():
                raise RuntimeError("tiling left pixels without a prediction")
            mask = (acc[:n_rows] / norm[:n_rows]) >= settings.threshold
            labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
            labels = labels.astype(np.int64)
            if n:
                first = seams.add(n, np.bincount(labels.ravel(), minlength=n + 1)[1:])
                labels[labels > 0] += first - 1
            if last_row is not None:
                seams.join(last_row, labels[0])
            last_row = labels[-1].copy()
            provisional[base:upto] = labels
            acc[: band_h - n_rows] = acc[n_rows:]
            norm[: band_h - n_rows] = norm[n_rows:]
            acc[band_h - n_rows:] = 0
            norm[band_h - n_rows:] = 0
            base = upto

        for i, (y0, y1) in enumerate(rows_of):
            finish(y0)
            boxes = [(y0, y1, x0, x1, i > 0, i < len(rows_of) - 1, j > 0, j < len(cols_of) - 1)
                     for j, (x0, x1) in enumerate(cols_of)]
            by_shape: dict[tuple[int, int], list[tuple]] = {}
            for b in boxes:
                by_shape.setdefault((b[1] - b[0], b[3] - b[2]), []).append(b)
            for group in by_shape.values():
                for start in range(0, len(group), settings.batch):
                    chunk = group[start: start + settings.batch]
                    x = np.stack([unit(image.read(a, b, c, d)) for a, b, c, d, *_ in chunk])[:, None]
                    prob = _probability(model, normalise(x), None)
                    for p, (a, b, c, d, top, bottom, left, right) in zip(prob, chunk):
                        wt = _ramp(b - a, top, bottom, margin, ramp)[:, None] * _ramp(d - c, left, right, margin, ramp)[None, :]
                        acc[a - base: b - base, c:d] += p * wt
                        norm[a - base: b - base, c:d] += wt
            bar.update(detail=f"tile row {i + 1}/{len(rows_of)}")
        finish(h)

        # Second pass: provisional → final labels 1..N in raster order of first appearance, small cells dropped.
        roots = seams.roots()
        areas = np.bincount(roots, weights=seams.area, minlength=len(roots)).astype(np.int64)
        keep = areas >= max(settings.min_size, 1)
        keep[0] = False
        final = np.zeros(len(roots), np.int64)  # by root
        next_id = 1
        tmp_masks, tmp_labels = work / "masks.ome.zarr", work / "labels.ome.zarr"
        masks_out = _create_ngff(tmp_masks, stem, (h, w), np.uint8, tile, label=False)
        labels_out = _create_ngff(tmp_labels, stem, (h, w), np.uint32, tile, label=True)
        for k, (y0, y1) in enumerate(_bands(h, band_h)):
            band_roots = roots[np.asarray(provisional[y0:y1])]
            band_roots[~keep[band_roots]] = 0
            flat = band_roots.ravel()
            present, first_at = np.unique(flat, return_index=True)
            new = [r for _, r in sorted(zip(first_at, present)) if r and final[r] == 0]
            final[new] = np.arange(next_id, next_id + len(new))
            next_id += len(new)
            labels_out[y0:y1] = final[band_roots].astype(np.uint32)
            masks_out[y0:y1] = (band_roots > 0).astype(np.uint8) * np.uint8(255)
            bar.update(detail=f"labels rows {y0}–{y1}")
        kept_area = areas[keep]
        cells = next_id - 1
        if settings.rois:
            area_of = np.zeros(cells + 1, np.int64)
            area_of[final[keep]] = areas[keep]
            _write_streamed_rois(out / "rois", stem, path.name, labels_out, band_h, area_of, settings.rois)
        for kind, tmp, array in (("masks", tmp_masks, masks_out), ("labels", tmp_labels, labels_out)):
            (out / kind).mkdir(parents=True, exist_ok=True)
            if output == "ome-zarr":
                _replace_dir(tmp, out / kind / f"{stem}.ome.zarr")
            else:
                _write_bigtiff(out / kind / f"{stem}.tif", array, tile=max(16, tile // 16 * 16))
    finally:
        image.close()
        shutil.rmtree(work, ignore_errors=True)
    return ImageResult(path.name, cells, float(kept_area.mean()) if cells else 0.0, float(kept_area.sum()) / (h * w))


def predict_inputs(model: SegmentationModel, inputs: list[Path], out: str | Path, settings, progress: bool = True,
                   large_output: str = "auto"):
    """``fsmeta predict``: every input, the large ones streamed (:func:`predict_large`), the others in
    memory (:func:`fsmeta.predict.predict_files`); one counts.csv with a row per image in input order."""
    from fsmeta.predict import predict_files, write_counts

    settings.check()
    large = [p for p in inputs if is_large(p)]
    small = [p for p in inputs if p not in large]
    stems = [_stem(p) if p in large else p.stem for p in inputs]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise FsmetaError(f"input names clash once extensions are dropped: {', '.join(clash)}; rename one of each")
    rows = {p: r for p, r in zip(small, _rows_by_input(predict_files(model, small, out, settings, progress=progress), small))}
    for p in large:
        rows[p] = [predict_large(model, p, out, settings, progress=progress, output=large_output)]
    ordered = [r for p in inputs for r in rows[p]]
    write_counts(Path(out) / "counts.csv", ordered)
    return ordered


def _rows_by_input(rows, inputs: list[Path]) -> list[list]:
    """predict_files' rows (one per page) grouped by the input they came from."""
    grouped: list[list] = []
    it = iter(rows)
    pending = next(it, None)
    for p in inputs:
        mine = []
        while pending is not None and (pending.name == p.name or pending.name.startswith(p.name + "#")):
            mine.append(pending)
            pending = next(it, None)
        grouped.append(mine)
    return grouped


def _write_streamed_rois(folder: Path, stem: str, name: str, labels, band: int, area_of: np.ndarray, formats) -> None:
    """ROI files of a streamed image, as :func:`fsmeta.rois.write_rois` writes them for one page: bounding boxes
    in a first pass over bands, then each cell traced from the band that holds it whole, or from its own window."""
    from scipy import ndimage

    from fsmeta.rois import CellOutline, outline_points, write_geojson, write_imagej

    n = len(area_of) - 1
    h, w = labels.shape
    lo_y, hi_y = np.full(n + 1, h, np.int64), np.zeros(n + 1, np.int64)
    lo_x, hi_x = np.full(n + 1, w, np.int64), np.zeros(n + 1, np.int64)
    for y0, y1 in _bands(h, band):
        for k, box in enumerate(ndimage.find_objects(np.asarray(labels[y0:y1])), start=1):
            if box is not None:
                lo_y[k], hi_y[k] = min(lo_y[k], box[0].start + y0), max(hi_y[k], box[0].stop + y0)
                lo_x[k], hi_x[k] = min(lo_x[k], box[1].start), max(hi_x[k], box[1].stop)
    points: list[np.ndarray | None] = [None] * (n + 1)
    for y0, y1 in _bands(h, band):
        rows = np.asarray(labels[y0:y1])
        for k in np.flatnonzero((lo_y >= y0) & (hi_y <= y1) & (hi_y > 0)):
            window = rows[lo_y[k] - y0: hi_y[k] - y0, lo_x[k]: hi_x[k]] == k
            points[k] = outline_points(window, int(lo_y[k]), int(lo_x[k]))
    for k in range(1, n + 1):
        if points[k] is None:  # crosses a band edge: read its own window
            window = np.asarray(labels[lo_y[k]: hi_y[k], lo_x[k]: hi_x[k]]) == k
            points[k] = outline_points(window, int(lo_y[k]), int(lo_x[k]))
    outlines = [CellOutline(k, points[k], int(area_of[k])) for k in range(1, n + 1)]
    if "imagej" in formats:
        write_imagej(folder / f"{stem}.zip", [outlines])
    if "geojson" in formats:
        write_geojson(folder / f"{stem}.geojson", outlines, name)


def _stem(path: Path) -> str:
    """The output name of a streamed image: ``slide.ome.zarr``, ``slide.zarr``, ``slide.ome.tif`` → ``slide``."""
    return path.stem.removesuffix(".ome")


def _bands(h: int, band: int) -> list[tuple[int, int]]:
    return [(y0, min(h, y0 + band)) for y0 in range(0, h, band)]


__all__ = ["LARGE_PIXELS", "is_large", "open_lazy", "LazyImage", "predict_large", "predict_inputs"]
