"""Segment new images with trained weights: tiled inference, masks, instance labels, counts, overlays.

Any image size runs in bounded memory: the image is cut into ``tile``×``tile``
windows that overlap by ``overlap`` pixels, run through the model in batches, and
stitched. Tile origins are multiples of the model's pooling stride, so every tile
sees the same pooling grid as the whole image would. Near an inner tile edge a
prediction sees the tile's border instead of the neighbouring pixels; so each
tile's weight is 0 over the outer ``min(RECEPTIVE_MARGIN, overlap // 2)`` pixels
of its inner edges and rises linearly to 1 across the rest of the overlap (the
weights of overlapping tiles are normalised to sum to 1). With ``overlap ≥
2 × RECEPTIVE_MARGIN`` (64 px by default) every kept pixel is computed from the
same input as in a whole-image pass, so tiled and whole-image probabilities agree
to float rounding in eval mode; a smaller overlap trades exactness for speed.

Outputs under ``OUT``: ``masks/<name>.png`` (0/255; ``.tif`` for TIFF input),
``labels/<name>.png`` (16-bit instance labels; ``.tif`` for TIFF input or more
than 65,535 cells), ``overlays/<name>.png`` (the image with cell outlines), and
``counts.csv`` (image, cells, mean area in pixels, foreground fraction), and on request
``rois/<name>.zip`` (ImageJ ROIs) and ``rois/<name>.geojson`` (QuPath), one polygon per
cell (:mod:`fsmeta.rois`). An RGB input's overlay is drawn on its colours. Multi-page
TIFF input gives multi-page masks and labels, one overlay and one row per page.
Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsmeta.atomic import atomic_write
from fsmeta.compute import autocast, channels_last, to_device
from fsmeta.config import ComputeConfig
from fsmeta.data.crops import normalise
from fsmeta.data.io import IMAGE_SUFFIXES, image_to_unit, list_images, read_planes
from fsmeta.data.store import to_unit_float
from fsmeta.errors import FsmetaError
from fsmeta.models import SegmentationModel

log = logging.getLogger(__name__)

# Pixels from a tile edge beyond which a prediction no longer depends on what lies
# outside the tile: measured 23 px for FCRN and 26 px for the U-Net (tests check it),
# rounded up to a multiple of the models' strides.
RECEPTIVE_MARGIN = 32


@dataclass(frozen=True)
class PredictSettings:
    tile: int = 512
    overlap: int = 64
    batch: int = 4  # tiles per forward pass
    threshold: float = 0.5
    watershed: bool = False
    min_distance: int = 5  # watershed: minimum distance between seeds (pixels)
    min_size: int = 0  # cells smaller than this (pixels) are dropped; 0 keeps all
    rois: tuple[str, ...] = ()  # cell outlines to write under rois/: "imagej", "geojson" (fsmeta.rois)
    colour: str = "grey"  # the channel the model reads (its checkpoint's ``colour``): grey | haematoxylin

    def check(self) -> "PredictSettings":
        if self.tile < 16:
            raise FsmetaError(f"--tile {self.tile} is too small (at least 16)")
        if not 0 <= self.overlap < self.tile // 2:
            raise FsmetaError(f"--overlap {self.overlap} must be at least 0 and less than half the tile ({self.tile // 2})")
        if self.batch < 1:
            raise FsmetaError(f"--batch {self.batch} must be at least 1")
        if not 0.0 < self.threshold < 1.0:
            raise FsmetaError(f"--threshold {self.threshold} must lie strictly between 0 and 1")
        if self.min_size < 0 or self.min_distance < 1:
            raise FsmetaError("--min-size must be ≥ 0 and --min-distance ≥ 1")
        if self.colour not in ("grey", "haematoxylin"):
            raise FsmetaError(f"colour {self.colour!r} is not 'grey' or 'haematoxylin'")
        if self.rois:
            from fsmeta.rois import parse_formats

            parse_formats(",".join(self.rois))
        return self


# ---------------------------------------------------------------- probabilities


def tile_layout(length: int, tile: int, overlap: int, stride: int) -> tuple[list[int], int]:
    """Tile origins along one axis and the tile length used, for an axis of ``length`` pixels.

    As few tiles as ``tile`` and ``overlap`` allow, then shrunk to share the axis evenly
    (a 2048-px axis takes five 464-px tiles, not five 512-px tiles overlapping by up to
    200 px). Origins are multiples of ``stride``; neighbours overlap by at least
    ``overlap``; the last tile runs to the end of the axis (up to ``stride - 1`` longer).
    """
    if length <= tile:
        return [0], length
    n = -(-(length - overlap) // (tile - overlap))
    while True:
        t = -(-(-(-(length - overlap) // n) + overlap) // stride) * stride
        if t > tile:
            n += 1
            continue
        starts = [((k * (length - t)) // (n - 1)) // stride * stride for k in range(n)]
        if all(b - a <= t - overlap for a, b in zip(starts, starts[1:])):
            return starts, t
        t_next = t + stride  # rounding to the stride widened a gap: grow the tiles a little
        if t_next > tile:
            n += 1
            continue
        starts = [((k * (length - t_next)) // (n - 1)) // stride * stride for k in range(n)]
        if all(b - a <= t_next - overlap for a, b in zip(starts, starts[1:])):
            return starts, t_next
        n += 1


def _ramp(n: int, lo_inner: bool, hi_inner: bool, margin: int, ramp: int) -> np.ndarray:
    """1-D weights of a tile of length ``n``: zero over ``margin`` px at inner edges, then a linear ramp."""
    w = np.ones(n, np.float32)
    d = np.arange(n, dtype=np.float32)
    for inner, dist in ((lo_inner, d), (hi_inner, d[::-1])):
        if inner:
            w = np.minimum(w, np.clip((dist - margin + 1) / (ramp + 1), 0.0, 1.0))
    return w


def _probability(model: SegmentationModel, x: np.ndarray, compute: ComputeConfig | None) -> np.ndarray:
    """σ(model(x)) of a normalised (B, 1, H, W) batch, on the model's device; (B, H, W) float32 on the host."""
    device = next(model.parameters()).device
    with autocast(device, compute):
        logits = model(to_device(torch.from_numpy(x), device, channels_last(device, compute)))
    return torch.sigmoid(logits.float())[:, 0].cpu().numpy()


@torch.no_grad()
def predict_tiled(model: SegmentationModel, image: np.ndarray, tile: int = 512, overlap: int = 64, batch: int = 4,
                  compute: ComputeConfig | None = None) -> np.ndarray:
    """Foreground probability (H, W) float32 of one image in [0, 1], by overlapping tiles.

    Args:
        image: (H, W) uint8 or float32 in [0, 1].
        tile: tile side (rounded down to the model's stride); an image no larger runs whole.
        overlap: pixels shared by neighbouring tiles (see the module docstring).
        batch: tiles per forward pass; bounds the memory with the tile size.
        compute: precision and memory format on the model's device (default: bf16
            autocast where the device has native bf16, else fp32; see :mod:`fsmeta.compute`).
    """
    model.eval()
    stride = int(getattr(model, "stride", 8))
    h, w = image.shape
    tile = max(2 * stride, (tile // stride) * stride)
    margin = min(RECEPTIVE_MARGIN, overlap // 2)
    ramp = max(overlap - 2 * margin, 0)
    (ys, ty), (xs, tx) = tile_layout(h, tile, overlap, stride), tile_layout(w, tile, overlap, stride)
    if len(ys) == 1 and len(xs) == 1:
        return _probability(model, normalise(to_unit_float(image))[None, None], compute)[0]
    acc = np.zeros((h, w), np.float32)
    norm = np.zeros((h, w), np.float32)
    boxes = []
    for i, y0 in enumerate(ys):
        y1 = h if i == len(ys) - 1 else y0 + ty
        for j, x0 in enumerate(xs):
            x1 = w if j == len(xs) - 1 else x0 + tx
            boxes.append((y0, y1, x0, x1, i > 0, i < len(ys) - 1, j > 0, j < len(xs) - 1))
    # Tiles of one shape go through the model together.
    by_shape: dict[tuple[int, int], list[tuple]] = {}
    for b in boxes:
        by_shape.setdefault((b[1] - b[0], b[3] - b[2]), []).append(b)
    for group in by_shape.values():
        for start in range(0, len(group), batch):
            chunk = group[start : start + batch]
            x = np.stack([to_unit_float(image[y0:y1, x0:x1]) for y0, y1, x0, x1, *_ in chunk])[:, None]
            prob = _probability(model, normalise(x), compute)
            for p, (y0, y1, x0, x1, top, bottom, left, right) in zip(prob, chunk):
                wy = _ramp(y1 - y0, top, bottom, margin, ramp)
                wx = _ramp(x1 - x0, left, right, margin, ramp)
                wt = wy[:, None] * wx[None, :]
                acc[y0:y1, x0:x1] += p * wt
                norm[y0:y1, x0:x1] += wt
    if not (norm > 0).all():  # cannot happen for overlap < tile / 2; a guard against silent holes
        raise RuntimeError("tiling left pixels without a prediction")
    return acc / norm


@torch.no_grad()
def predict_whole(model: SegmentationModel, image: np.ndarray, compute: ComputeConfig | None = None) -> np.ndarray:
    """Probability of the whole image in one forward pass (memory grows with the image)."""
    model.eval()
    return _probability(model, normalise(to_unit_float(image))[None, None], compute)[0]


# ---------------------------------------------------------------- masks to cells


def instance_labels(mask: np.ndarray, watershed: bool = False, min_distance: int = 5, min_size: int = 0) -> np.ndarray:
    """Instance labels (H, W) int32 from a binary mask: 8-connected components, optionally
    split by a watershed on the distance transform seeded at its local maxima (touching
    nuclei); components smaller than ``min_size`` pixels are dropped. Labels are 1..N."""
    from scipy import ndimage

    mask = mask.astype(bool)
    structure = np.ones((3, 3), bool)
    labels, n = ndimage.label(mask, structure=structure)
    if watershed and n:
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed as ws

        distance = ndimage.distance_transform_edt(mask)
        peaks = peak_local_max(distance, min_distance=min_distance, labels=labels, exclude_border=False)
        markers = np.zeros(mask.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        # A component without a peak (e.g. one pixel wide) keeps a seed of its own.
        seeded = np.zeros(n + 1, bool)
        seeded[labels[tuple(peaks.T)]] = True
        for k in np.flatnonzero(~seeded[1:]) + 1:
            first = np.argwhere(labels == k)[0]
            markers[tuple(first)] = markers.max() + 1
        labels = ws(-distance, markers, mask=mask, connectivity=2).astype(np.int32)
    if min_size > 0 and labels.max():
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
    # Relabel 1..N in order of first appearance.
    present = np.unique(labels)
    present = present[present > 0]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lut[labels]


def outline_overlay(image: np.ndarray, labels: np.ndarray, colour: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8: the image with cell outlines in yellow and cell interiors tinted green.

    The image is the grey ``image`` contrast-stretched to its 0.5–99.5 percentiles, or,
    when ``colour`` is an (H, W, 3|4) RGB(A) plane (e.g. H&E), those colours as the user
    sees them (8-bit kept as is, other depths stretched over all three channels together).
    """
    from skimage.segmentation import find_boundaries

    if colour is not None and colour.ndim == 3 and colour.shape[-1] in (3, 4):
        rgb = _display_rgb(colour[..., :3])
    else:
        x = to_unit_float(image)
        lo, hi = np.percentile(x, [0.5, 99.5]) if x.size else (0.0, 1.0)
        g = np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else x
        rgb = np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=-1)
    inside = labels > 0
    rgb[inside, 1] = np.maximum(rgb[inside, 1], (0.5 * rgb[inside, 1] + 96).astype(np.uint8))
    edges = find_boundaries(labels, mode="inner")
    rgb[edges] = (255, 220, 0)
    return rgb


def _display_rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 for display: 8-bit as is; other depths scaled by one range for all channels (hues kept)."""
    if rgb.dtype == np.uint8:
        return np.array(rgb, copy=True)  # drawn on below; the caller's plane stays as read
    x = rgb.astype(np.float32)
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)
    return (scaled * 255).astype(np.uint8)


# ---------------------------------------------------------------- writing


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _save_tiff(path: Path, planes: list[np.ndarray]) -> None:
    import tifffile

    data = planes[0] if len(planes) == 1 else np.stack(planes)
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib", photometric="minisblack"))


@dataclass
class ImageResult:
    name: str  # the row name in counts.csv
    cells: int
    mean_area: float
    foreground: float


def list_inputs(path: str | Path) -> list[Path]:
    """The images to segment: one file or OME-Zarr folder, or every TIFF, PNG, JPEG or BMP and ``*.zarr`` of a folder."""
    path = Path(path)
    if path.is_dir() and path.suffix.lower() == ".zarr":  # an OME-Zarr image is a folder
        return [path]
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise FsmetaError(f"{path} is not a TIFF, PNG, JPEG or BMP image (fsmeta reads {', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if not path.exists():
        raise FsmetaError(f"input {path} does not exist")
    zarrs = sorted(p for p in path.iterdir() if p.is_dir() and p.suffix.lower() == ".zarr")
    if not zarrs:
        return list_images(path, "input")
    if not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        return zarrs
    return sorted([*list_images(path, "input"), *zarrs])


def check_inputs(inputs: list[Path], colour: str = "grey") -> None:
    """Read every input once before anything is written, so one bad file leaves no partial
    outputs; one error names every unreadable file (and, for a model that reads the
    haematoxylin channel, every image that is not RGB)."""
    errors = []
    for path in inputs:
        try:
            planes = read_planes(path)
            for k, plane in enumerate(planes):
                image_to_unit(plane, f"{path}" + (f" page {k}" if len(planes) > 1 else ""), colour)
        except FsmetaError as exc:
            errors.append(str(exc))
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  … and {len(errors) - 20} more" if len(errors) > 20 else "")
        why = ("" if colour == "grey" else f"\nthe model was fine-tuned on the {colour} channel of RGB images (its checkpoint "
               "records colour); give it RGB images of that staining")
        raise FsmetaError(f"{len(errors)} of {len(inputs)} input image(s) cannot be segmented; nothing was written:\n  {shown}{why}")


def predict_files(
    model: SegmentationModel,
    inputs: list[Path],
    out: str | Path,
    settings: PredictSettings = PredictSettings(),
    progress: bool = True,
) -> list[ImageResult]:
    """Segment every input file; write masks, labels, overlays and counts.csv under ``out``."""
    from fsmeta.progress import Progress

    settings.check()
    out = Path(out)
    stems = [p.stem for p in inputs]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise FsmetaError(f"input names clash once extensions are dropped: {', '.join(dupes)}; rename one of each")
    check_inputs(inputs, settings.colour)
    model.eval()
    rows: list[ImageResult] = []
    bar = Progress(len(inputs), "predict", enabled=progress)
    for path in inputs:
        planes = read_planes(path)
        tiff = path.suffix.lower() in (".tif", ".tiff")
        masks, labels_list = [], []
        for k, plane in enumerate(planes):
            where = f"{path}" + (f" page {k}" if len(planes) > 1 else "")
            image = image_to_unit(plane, where, settings.colour)
            prob = predict_tiled(model, image, settings.tile, settings.overlap, settings.batch)
            mask = prob >= settings.threshold
            labels = instance_labels(mask, settings.watershed, settings.min_distance, settings.min_size)
            if settings.min_size:
                mask = labels > 0
            n = int(labels.max())
            areas = np.bincount(labels.ravel())[1:] if n else np.zeros(0)
            name = path.name + (f"#{k}" if len(planes) > 1 else "")
            rows.append(ImageResult(name, n, float(areas.mean()) if n else 0.0, float(mask.mean())))
            masks.append(mask.astype(np.uint8) * np.uint8(255))
            labels_list.append(labels)
            suffix = f"-p{k:03d}" if len(planes) > 1 else ""
            _save_png(out / "overlays" / f"{path.stem}{suffix}.png", outline_overlay(image, labels, colour=plane))
        top = max(int(lab.max()) for lab in labels_list)
        label_dtype = np.uint16 if top < 65536 else np.uint32
        labels_out = [lab.astype(label_dtype) for lab in labels_list]
        if tiff or len(planes) > 1:
            _save_tiff(out / "masks" / f"{path.stem}.tif", masks)
        else:
            _save_png(out / "masks" / f"{path.stem}.png", masks[0])
        if tiff or len(planes) > 1 or label_dtype == np.uint32:
            _save_tiff(out / "labels" / f"{path.stem}.tif", labels_out)
        else:
            _save_png(out / "labels" / f"{path.stem}.png", labels_out[0])
        if settings.rois:
            from fsmeta.rois import write_rois

            write_rois(out / "rois", path.stem, labels_list, settings.rois, image_name=path.name)
        bar.update(detail=f"{path.name}: {rows[-1].cells} cells")
    write_counts(out / "counts.csv", rows)
    return rows


def write_counts(path: Path, rows: list[ImageResult]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "cells", "mean_area_px", "foreground_fraction"])
    for r in rows:
        writer.writerow([r.name, r.cells, f"{r.mean_area:.1f}", f"{r.foreground:.5f}"])
    data = buf.getvalue().encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def resolve_weights(weights: str, tracking_uri: str = "", cache: str | Path | None = None) -> Path:
    """A checkpoint path, or an MLflow URI (``runs:/<id>/<path>``, ``models:/…``, ``mlflow-artifacts:/…``)
    downloaded through :mod:`fsmeta.tracking`; a downloaded folder must hold one ``.safetensors``."""
    if "://" not in weights and not weights.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        path = Path(weights)
        if not path.is_file():
            raise FsmetaError(f"weights {path} do not exist (give a .safetensors checkpoint or an MLflow runs:/ URI)")
        return path
    from fsmeta.tracking import download_artifact

    local = download_artifact(weights, tracking_uri=tracking_uri, dst=cache)
    if local.is_dir():
        found = sorted(local.rglob("*.safetensors"))
        if len(found) != 1:
            raise FsmetaError(f"{weights} holds {len(found)} .safetensors files; name the one to use in the URI")
        local = found[0]
    return local


__all__ = [
    "PredictSettings", "predict_tiled", "predict_whole", "instance_labels", "outline_overlay", "predict_files",
    "resolve_weights", "list_inputs", "tile_layout", "RECEPTIVE_MARGIN",
]
