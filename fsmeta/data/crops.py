"""Training windows: an index of (image, y, x) crops, built once, gathered into batches on demand.

A crop is a ``size``×``size`` window fully inside its image, on a grid with the
data set's stride, kept only when its mask has at least ``min_foreground``
foreground pixels (SPEC §3.1). The index stores coordinates, not pixels, so a
pool of thousands of crops costs a few kilobytes on top of the memory-mapped store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsmeta.data.store import ImageSet
from fsmeta.errors import DataError


@dataclass(frozen=True)
class CropIndex:
    """Coordinates of crops into an :class:`ImageSet`; row ``r`` is ``image[r], y[r], x[r]``."""

    image: np.ndarray  # int32 index into the image set
    y: np.ndarray
    x: np.ndarray
    size: int

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def select(self, rows: np.ndarray) -> "CropIndex":
        return CropIndex(self.image[rows], self.y[rows], self.x[rows], self.size)


def grid_positions(extent: int, size: int, stride: int, cover: bool = False) -> np.ndarray:
    """Window starts along one side: 0, stride, 2·stride, … while the window fits; with ``cover``,
    also the window flush with the far edge when the grid stops short of it, so every pixel lies in
    some window (a 360-px side cut into 128-px windows at stride 64 otherwise leaves its last 40 px out)."""
    starts = np.arange(0, extent - size + 1, stride)
    if cover and starts.size and starts[-1] != extent - size:
        starts = np.append(starts, extent - size)
    return starts


def window_foreground(mask: np.ndarray, size: int, stride: int, cover: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground count of every grid window (:func:`grid_positions`), via a summed-area table (no per-window loop).

    Returns (ys, xs, counts) with counts[i, j] for the window at (ys[i], xs[j]).
    """
    h, w = mask.shape
    ys = grid_positions(h, size, stride, cover)
    xs = grid_positions(w, size, stride, cover)
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    y0, x0 = ys[:, None], xs[None, :]
    counts = sat[y0 + size, x0 + size] - sat[y0, x0 + size] - sat[y0 + size, x0] + sat[y0, x0]
    return ys, xs, counts


def fitted_crop(images: ImageSet, size: int, min_foreground: int,
                subset: list[int] | np.ndarray | None = None, what: str = "image") -> tuple[int, int, str]:
    """The crop side and foreground threshold to cut the images in ``subset`` (default: all) with.

    Images smaller than the crop are common in a lab's own data; then the crop shrinks to the
    smallest image side (rounded down to a multiple of 8, the models' pooling stride, at least 8)
    and ``min_foreground`` shrinks with the crop's area (a positive threshold stays at least 1).
    The same rule serves ``fsmeta finetune`` on a user's folders, the benchmark's K-shot cells
    and the pretext θ′, so a data set of small images is cut alike by all three.
    Returns (size, min_foreground, a note for the user naming ``what`` or "").
    """
    rows = range(len(images)) if subset is None else [int(i) for i in subset]
    smallest = min((min(images.masks[i].shape[:2]) for i in rows), default=size)
    if smallest >= size:
        return size, min_foreground, ""
    shrunk = max(8, (smallest // 8) * 8)
    minimum = max(1, int(round(min_foreground * (shrunk / size) ** 2))) if min_foreground > 0 else 0
    return shrunk, minimum, (f"the smallest {what} side is {smallest} px, less than the {size}-px crop; "
                             f"using {shrunk}×{shrunk} crops with at least {minimum} foreground pixels instead")


def build_crop_index(
    images: ImageSet,
    size: int,
    stride: int,
    min_foreground: int = 360,
    subset: list[int] | np.ndarray | None = None,
    cover: bool = False,
) -> CropIndex:
    """Index every valid crop of the images in ``subset`` (default: all); ``cover``: the grid
    reaches every image's far edges (:func:`grid_positions`).

    Raises :class:`DataError` naming the data set when no crop survives, e.g.
    because every image is smaller than ``size`` or has too little foreground.
    """
    if stride < 1:
        raise DataError(f"crop stride must be at least 1, got {stride} for data set {images.name}")
    rows = range(len(images)) if subset is None else [int(i) for i in subset]
    parts_i, parts_y, parts_x = [], [], []
    too_small = []
    for i in rows:
        mask = images.masks[i]
        if mask.shape[0] < size or mask.shape[1] < size:
            too_small.append(images.ids[i])
            continue
        ys, xs, counts = window_foreground(mask, size, stride, cover)
        keep_y, keep_x = np.nonzero(counts >= min_foreground)
        parts_i.append(np.full(keep_y.shape, i, dtype=np.int32))
        parts_y.append(ys[keep_y].astype(np.int32))
        parts_x.append(xs[keep_x].astype(np.int32))
    index = CropIndex(
        np.concatenate(parts_i) if parts_i else np.zeros(0, np.int32),
        np.concatenate(parts_y) if parts_y else np.zeros(0, np.int32),
        np.concatenate(parts_x) if parts_x else np.zeros(0, np.int32),
        size,
    )
    if len(index) == 0:
        detail = f"{len(too_small)} image(s) smaller than {size}×{size}" if too_small else (
            f"no {size}×{size} window at stride {stride} has {min_foreground} foreground pixels"
        )
        raise DataError(f"data set {images.name}: no training crops ({detail})")
    return index


def normalise(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[0, 1] → [-1, 1], as ``(x - 0.5) / 0.5`` (SPEC §3.1); into ``out`` (may be ``x``) when given."""
    return np.divide(np.subtract(x, np.float32(0.5), out=out), np.float32(0.5), out=out)


def gather(
    images: ImageSet,
    index: CropIndex,
    rows: np.ndarray | list[int] | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Crops as model input: x (n, 1, s, s) float32 in [-1, 1] and y (n, 1, s, s) float32 {0, 1}.

    Each crop is read once from its memory-mapped image, converted and written
    straight into the batch; scaling and normalisation run in place, so a batch
    costs no temporary arrays of its size.

    Args:
        out: (x, y) float32 arrays of shape (n, 1, s, s) to fill, e.g. numpy views of
            pinned torch tensors (:func:`fsmeta.compute.host_buffer`); new arrays when None.
    """
    sel = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
    s = index.size
    shape = (len(sel), 1, s, s)
    if out is None:
        x, y = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
    else:
        x, y = out
        if x.shape != shape or y.shape != shape or x.dtype != np.float32 or y.dtype != np.float32:
            raise ValueError(f"gather: out arrays must be float32 of shape {shape}, got {x.dtype}{x.shape} and {y.dtype}{y.shape}")
    scale = np.float32(1.0 / 255.0)
    for k, r in enumerate(sel):
        i, y0, x0 = int(index.image[r]), int(index.y[r]), int(index.x[r])
        img = images.images[i][y0 : y0 + s, x0 : x0 + s]
        if img.dtype == np.uint8:
            np.multiply(img, scale, out=x[k, 0])
        else:
            x[k, 0] = img
        y[k, 0] = images.masks[i][y0 : y0 + s, x0 : x0 + s]
    return normalise(x, out=x), y
