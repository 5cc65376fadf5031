"""The prepared-data store: one Arrow IPC file per data set, memory-mapped on read.

Layout under the data root::

    ROOT/NAME/store.arrow   rows: id, image (raw bytes), mask (raw uint8 bytes),
                            height, width, split, source
    ROOT/NAME/meta.json     name, kind, counts, foreground fraction, provenance

Images are kept in their own dtype (uint8, or float32 already scaled to [0, 1])
and turned into float32 [0, 1] only when a crop is taken, so a store of 8-bit
images costs one byte per pixel on disk and in memory. A store is written into
a temporary folder and renamed into place: a failed or interrupted write leaves
no partial store behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from fsmeta.atomic import sweep_stale
from fsmeta.errors import DataError

STORE_FILE = "store.arrow"
META_FILE = "meta.json"
IMAGE_DTYPES = ("uint8", "float32")
_MAX_NAME = 200  # characters of a data set name or image id: room for suffixes under the 255-byte file-name limit

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.large_binary()),
        ("mask", pa.large_binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("split", pa.string()),
        ("source", pa.string()),
    ]
)


@dataclass
class Record:
    """One image of a data set, ready to store."""

    id: str
    image: np.ndarray  # (H, W) uint8, or float32 in [0, 1]
    mask: np.ndarray  # (H, W) {0, 1}
    split: str = "train"
    source: str = ""


@dataclass
class ImageSet:
    """A prepared data set, its arrays memory-mapped from the store (read-only)."""

    name: str
    ids: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    splits: list[str]
    sources: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as float32 in [0, 1]."""
        return to_unit_float(self.images[i])

    def foreground_fraction(self) -> float:
        fg = sum(int(np.count_nonzero(m)) for m in self.masks)
        total = sum(m.size for m in self.masks)
        return fg / total if total else 0.0

    def subset(self, indices: Iterable[int]) -> "ImageSet":
        idx = list(indices)
        return ImageSet(
            self.name,
            [self.ids[i] for i in idx],
            [self.images[i] for i in idx],
            [self.masks[i] for i in idx],
            [self.splits[i] for i in idx],
            [self.sources[i] for i in idx],
            self.meta,
        )


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """A store-ready image (uint8 or float32 [0, 1]) as float32 in [0, 1]."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) * np.float32(1.0 / 255.0)
    return image.astype(np.float32, copy=False)


def check_name(value: object, what: str = "image id") -> str:
    """``value`` if it can safely become one file name, else a :class:`DataError` naming it.

    Ids and data set names end up as file names (``to_annotate/ID.png``, ``ROOT/NAME``),
    so none may climb out of its folder or hide: no ``/`` or ``\\``, not ``.``/``..``
    or a leading dot, no control characters, not blank or padded with spaces.
    """
    text = value if isinstance(value, str) else None
    problem = ""
    if text is None:
        problem = f"is a {type(value).__name__}, not text"
    elif not text.strip():
        problem = "is empty or blank"
    elif text != text.strip():
        problem = "starts or ends with a space"
    elif "/" in text or "\\" in text:
        problem = "contains a path separator ('/' or '\\')"
    elif text.startswith("."):
        problem = "starts with '.'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        problem = "contains a control character"
    elif len(text) > _MAX_NAME:
        problem = f"is longer than {_MAX_NAME} characters"
    if problem:
        raise DataError(f"invalid {what} {value!r}: it {problem}; it becomes a file name, "
                        "so use letters, digits, spaces inside, '-', '_' and '.' (not first)")
    return text


def is_store_folder(folder: Path) -> bool:
    """True when ``folder`` holds an fsmeta data set and nothing else (so replacing it loses nothing)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    names = {p.name for p in folder.iterdir()}
    return STORE_FILE in names and names <= {STORE_FILE, META_FILE}


def _check_record(name: str, rec: Record, dtype: str) -> None:
    img, mask = rec.image, rec.mask
    where = rec.source or rec.id
    if img.ndim != 2:
        raise DataError(f"{where}: image must be single-channel 2-D, got shape {img.shape}")
    if mask.shape != img.shape:
        raise DataError(
            f"{where}: mask is {mask.shape[1]}×{mask.shape[0]} but image is {img.shape[1]}×{img.shape[0]}"
        )
    if str(img.dtype) != dtype:
        raise DataError(f"{where}: image dtype {img.dtype} differs from the store's {dtype}")
    if dtype == "float32" and not (np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0):
        raise DataError(f"{where}: float image must be finite and scaled to [0, 1]")
    if mask.dtype != np.uint8 or mask.max(initial=0) > 1:
        raise DataError(f"{where}: mask must be uint8 with values 0/1 (data set {name})")


def write_store(
    root: str | Path,
    name: str,
    records: Iterable[Record],
    *,
    kind: str,
    image_dtype: str = "uint8",
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write a data set atomically to ``root/name``, replacing any previous store of that name.

    Records are streamed, so a large data set never sits in memory whole.
    Returns the store folder.
    """
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
    check_name(name, "data set name")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = check_replaceable(root, name)
    for stage in ("tmp", "old"):
        sweep_stale(root, f".{name}.{stage}-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=root))
    try:
        n, fg, px = 0, 0, 0
        ids: set[str] = set()
        shapes: set[tuple[int, int]] = set()
        with pa.OSFile(str(tmp / STORE_FILE), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            for rec in records:
                check_name(rec.id, f"image id (from {rec.source or name})")
                _check_record(name, rec, image_dtype)
                if rec.id in ids:
                    raise DataError(f"{rec.source or rec.id}: duplicate image id {rec.id!r} in data set {name}")
                ids.add(rec.id)
                h, w = rec.image.shape
                shapes.add((h, w))
                writer.write_batch(
                    pa.record_batch(
                        [
                            pa.array([rec.id]),
                            pa.array([np.ascontiguousarray(rec.image).tobytes()], pa.large_binary()),
                            pa.array([np.ascontiguousarray(rec.mask).tobytes()], pa.large_binary()),
                            pa.array([h], pa.int32()),
                            pa.array([w], pa.int32()),
                            pa.array([rec.split]),
                            pa.array([rec.source]),
                        ],
                        schema=SCHEMA,
                    )
                )
                n += 1
                fg += int(np.count_nonzero(rec.mask))
                px += rec.mask.size
        if n == 0:
            raise DataError(f"data set {name} has no images")
        meta = {
            "name": name,
            "kind": kind,
            "images": n,
            "image_dtype": image_dtype,
            "shapes": sorted([list(s) for s in shapes])[:10],
            "pixels": px,
            "foreground_fraction": fg / px,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra_meta or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        old = None
        if final.exists():
            if not is_store_folder(final):  # appeared while this store was written
                raise DataError(f"{final} exists and is not an fsmeta data set; nothing was replaced")
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=root))
            os.replace(final, old / name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(root: str | Path, name: str) -> Path:
    """``root/name`` if writing a data set there can only replace an fsmeta data set, else a DataError naming it."""
    final = Path(root) / check_name(name, "data set name")
    if (final.exists() or final.is_symlink()) and not is_store_folder(final):
        raise DataError(f"{final} exists and is not an fsmeta data set (it holds "
                        f"{_listing(final)}); fsmeta replaces only its own data sets: move it or choose another name")
    return final


def _listing(folder: Path, limit: int = 5) -> str:
    if not folder.is_dir():
        return "a file, not a folder"
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "nothing, but is not a data set"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_meta(root: str | Path, name: str) -> dict[str, Any] | None:
    path = Path(root) / name / META_FILE
    if not path.is_file() or not (Path(root) / name / STORE_FILE).is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt: {exc}") from None


def list_stores(root: str | Path) -> list[dict[str, Any]]:
    """Metadata of every prepared data set under ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        meta = read_meta(root, child.name)
        if meta is not None:
            meta["bytes"] = (child / STORE_FILE).stat().st_size
            out.append(meta)
    return out


def _binary_views(column: pa.ChunkedArray) -> Iterator[memoryview | np.ndarray]:
    """Zero-copy numpy views of each value of a large_binary column."""
    for chunk in column.chunks:
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
        for a, b in zip(offsets[:-1], offsets[1:]):
            yield data[a:b]


def open_store(root: str | Path, name: str) -> ImageSet:
    """Memory-map a prepared data set. Raises :class:`DataError` naming the file when it is missing or corrupt."""
    check_name(name, "data set name")
    folder = Path(root) / name
    meta = read_meta(root, name)
    if meta is None:
        raise DataError(f"data set {name!r} is not prepared under {Path(root)} (no {folder / STORE_FILE})")
    path = folder / STORE_FILE
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable fsmeta store: {exc}") from None
    if not table.schema.equals(SCHEMA):
        raise DataError(f"{path} has schema {table.schema}, expected {SCHEMA}")
    dtype = np.dtype(meta.get("image_dtype", "uint8"))
    heights = table["height"].to_numpy()
    widths = table["width"].to_numpy()
    images, masks = [], []
    for raw_img, raw_mask, h, w in zip(_binary_views(table["image"]), _binary_views(table["mask"]), heights, widths):
        if raw_img.size != h * w * dtype.itemsize or raw_mask.size != h * w:
            raise DataError(f"{path}: an image or mask does not match its recorded size {w}×{h}")
        images.append(raw_img.view(dtype).reshape(h, w))
        masks.append(raw_mask.reshape(h, w))
    ids = table["id"].to_pylist()
    for ident in ids:  # a store from elsewhere is input like any other
        check_name(ident, f"image id in {path}")
    return ImageSet(
        name=name,
        ids=ids,
        images=images,
        masks=masks,
        splits=table["split"].to_pylist(),
        sources=table["source"].to_pylist(),
        meta=meta,
    )
