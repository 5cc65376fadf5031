"""Reading microscopy images and masks from files, pairing them by name, importing a user's folders.

Formats: TIFF (``.tif``/``.tiff``, single page or a multi-page stack), PNG, JPEG
(``.jpg``/``.jpeg``) and BMP; 8- or 16-bit (or float TIFF), grey, grey+alpha, RGB or RGBA
(a TIFF's ImageJ/OME channel axis of 2–4 channels is read as those samples). Every reader raises
:class:`~fsmeta.errors.DataError` naming the file and what is wrong with it,
never a decoder's traceback.

Intensities (:func:`image_to_unit`): 8-bit images are divided by 255 and kept as
uint8; any other depth (16-bit, 32-bit, float) is scaled by the image's own
range, ``(x - min) / (max - min)``, to float32 in [0, 1], never clipped to 8 bits.
Colour becomes grey by ITU-R 601 luminance (0.299 R + 0.587 G + 0.114 B), or, for
stained brightfield RGB, the haematoxylin stain alone (:mod:`fsmeta.data.colour`:
``colour`` ``grey``, ``haematoxylin`` or ``auto``, decided per data set from its images);
alpha is dropped.

Masks (:func:`mask_to_binary`): binary or instance masks; foreground is every
non-zero pixel (any non-zero colour channel of an RGB(A) mask), unless a
preparer asks for the ``"half"`` rule (an 8-bit value above 127). A JPEG mask is lossy
(its edges carry compression noise), so its foreground is above half its commonest
non-zero value (:func:`mask_rule`), with a warning: that reads a binary mask, not instance labels.

Annotations drawn in Fiji or QuPath are masks too: a mask folder may hold ImageJ ROI sets
(``.zip``/``.roi``) and GeoJSON files (``.geojson``/``.json``), filled at the paired image's
size (:func:`fsmeta.data.annotations.read_annotation`), and NumPy ``.npy`` masks, Cellpose's ``_seg.npy``
included (:func:`read_npy_mask`: its ``masks`` entry, unpickled with NumPy's classes only).

Pairing (:func:`pair_by_name`): a mask belongs to the image with the same file
stem, ignoring letter case and the extension; a mask stem may also end in one of
:data:`MASK_SUFFIXES` (``cell01_mask.png`` pairs with ``cell01.tif``), and an image
stem in one of :data:`IMAGE_NAME_SUFFIXES` (``000_img.png`` with ``000_masks.png``, the
layout of Cellpose's training folders, where images and masks may share one folder). Every
image needs exactly one mask and every mask one image.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fsmeta.data.store import ImageSet, Record, to_unit_float, write_store
from fsmeta.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
# Read through Pillow, with the name the user knows the format by (for error messages).
_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}
# Lossy formats: a mask saved in one carries compression noise around every edge (a 0/255 mask
# comes back with values 1–40 beside its objects), so "any non-zero value" would grow every object.
LOSSY_SUFFIXES = (".jpg", ".jpeg")
# Tried in this order after an exact stem match fails; the separator may be "_", "-", "." or " ".
# "cp_masks" is Cellpose's save_masks suffix (img_cp_masks.png); "rois" its ImageJ export (img_rois.zip).
MASK_SUFFIXES = ("mask", "masks", "label", "labels", "labelled", "gt", "groundtruth", "ground_truth", "seg", "annotation",
                 "roiset", "rois", "cp_masks")
# Mask files that are not images: NumPy arrays (Cellpose's GUI saves img_seg.npy); ImageJ ROI sets, GeoJSON, COCO
# and ImageScope XML are :data:`fsmeta.data.annotations.ANNOTATION_SUFFIXES`.
NPY_SUFFIX = ".npy"
_MASK_SUFFIX_RE = re.compile(r"[_\-. ](?:" + "|".join(MASK_SUFFIXES) + r")$", re.IGNORECASE)
# An image stem may end in one of these (Cellpose's training folders hold 000_img.png beside
# 000_masks.png); it is tried only when no image has the mask's name exactly.
IMAGE_NAME_SUFFIXES = ("img", "image", "raw")
_IMAGE_SUFFIX_RE = re.compile(r"[_\-. ](?:" + "|".join(IMAGE_NAME_SUFFIXES) + r")$", re.IGNORECASE)
# Files an operating system leaves in folders; never data.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
MIN_SIDE = 8  # the smallest image side fsmeta accepts: one cell of the models' 8× pooling
_LISTED = 20  # how many offending files an error message names before summarising
# The most pixels (all pages of a file together) a reader decodes: 2^28, a 16384×16384 image,
# 256 MiB as 8-bit and 1 GiB as float32 once converted. A larger file is refused from its header,
# before any pixel is decompressed, so a small crafted file cannot claim gigabytes.
DEFAULT_MAX_PIXELS = 2**28
MAX_PIXELS_ENV = "FSMETA_MAX_PIXELS"


def _names(paths: Iterable[object], limit: int = _LISTED) -> str:
    items = [str(p) for p in paths]
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------- reading


def max_pixels() -> int:
    """The pixel limit in force: ``$FSMETA_MAX_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise DataError(f"{MAX_PIXELS_ENV}={raw!r} must be a whole number of pixels, at least 1")
    return value


def check_pixels(path: str | Path, width: int, height: int, pages: int = 1) -> None:
    """Refuse, from the header's sizes, a file holding more pixels than :func:`max_pixels`."""
    limit = max_pixels()
    total = int(width) * int(height) * max(1, int(pages))
    if total > limit:
        stack = f" × {pages} pages" if pages > 1 else ""
        raise DataError(f"{path} declares {width}×{height} pixels{stack} ({total:,} pixels), more than fsmeta's "
                        f"limit of {limit:,}; cut it into tiles, or raise the limit with {MAX_PIXELS_ENV}=N")


def read_planes(path: str | Path) -> list[np.ndarray]:
    """The image planes of one file: a list of (H, W) or (H, W, C) arrays (C = 2, 3 or 4).

    A single image gives one plane; a multi-page TIFF stack gives one per page.
    Raises :class:`DataError` for a missing, empty, truncated, corrupt or
    unsupported file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes)")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        planes = _read_tiff(path)
    elif suffix in _PIL_FORMATS:
        planes = [_read_pil(path, _PIL_FORMATS[suffix])]
    else:
        raise DataError(f"{path} is not a TIFF, PNG, JPEG or BMP image (fsmeta reads {', '.join(IMAGE_SUFFIXES)})")
    for plane in planes:
        h, w = plane.shape[:2]
        if h < MIN_SIDE or w < MIN_SIDE:
            raise DataError(f"{path} is {w}×{h} pixels; fsmeta needs images of at least {MIN_SIDE}×{MIN_SIDE}")
    return planes


def read_image(path: str | Path) -> np.ndarray:
    """One 2-D image plane (H, W) or (H, W, C); a multi-page stack is an error here."""
    planes = read_planes(path)
    if len(planes) != 1:
        raise DataError(f"{path} is a stack of {len(planes)} pages; expected a single image")
    return planes[0]


def _read_tiff(path: Path) -> list[np.ndarray]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise DataError(f"{path} holds no image data")
            series = tif.series[0]
            _check_tiff_pixels(path, series)
            _check_tiff_size(path, tif)
            data = series.asarray()
            axes = series.axes
    except DataError:
        raise
    except Exception as exc:  # tifffile, zlib, struct and numpy errors all mean the same to a user
        raise DataError(f"{path} is not a readable TIFF (corrupt or truncated): {exc}") from None
    data = np.asarray(data)
    # Drop singleton axes (e.g. a 1-sample channel) but keep Y, X and any samples axis.
    keep = [i for i, a in enumerate(axes) if data.shape[i] != 1 or a in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path} has axes {axes!r} without both Y and X; not a 2-D image")
    stored = axes  # as the file names them, for messages
    if "C" in axes and "S" not in axes:
        # An ImageJ or OME channel axis is read as colour samples, as the streamed reader
        # (fsmeta.large) reads it: 2 channels as grey + alpha (the first), 3 or 4 as RGB(A), so a
        # channel axis is never mistaken for a stack of pages that its mask would then lack.
        n = data.shape[axes.index("C")]
        if n > 4:
            raise DataError(f"{path} has {n} channels (axes {axes!r}); fsmeta reads grey, 2-channel, RGB or RGBA "
                            "images: save the channel to segment as its own image")
        axes = axes.replace("C", "S")
    if "S" in axes:  # colour samples: move them last
        data = np.moveaxis(data, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    stack_axes = [a for a in axes if a not in "YXS"]
    if len(stack_axes) > 1:
        raise DataError(f"{path} has {data.ndim}-D data (axes {stored}); fsmeta reads 2-D images or one stack of pages")
    if stack_axes:
        data = np.moveaxis(data, axes.index(stack_axes[0]), 0)
        planes = [np.ascontiguousarray(p) for p in data]
    else:
        planes = [data]
    for p in planes:
        if p.ndim == 3 and p.shape[-1] not in (2, 3, 4):
            raise DataError(f"{path} has {p.shape[-1]} colour samples per pixel; fsmeta reads grey, RGB or RGBA")
    return planes


def _check_tiff_pixels(path: Path, series) -> None:
    shape, axes = tuple(series.shape), series.axes
    if "Y" not in axes or "X" not in axes:
        return  # refused after reading, by its axes
    h, w = shape[axes.index("Y")], shape[axes.index("X")]
    pages = 1
    for n, a in zip(shape, axes):
        if a not in "YXS":
            pages *= n
    check_pixels(path, w, h, pages)


def _check_tiff_size(path: Path, tif) -> None:
    """A TIFF cut short (an interrupted copy or download) names the bytes it lacks."""
    size = path.stat().st_size
    for page in tif.pages:
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        end = max((o + c for o, c in zip(offsets, counts)), default=0)
        if end > size:
            raise DataError(f"{path} is truncated: its image data ends at byte {end} but the file has {size} bytes")


def _read_pil(path: Path, kind: str = "PNG") -> np.ndarray:
    """A PNG, JPEG or BMP file (``kind``: the format its suffix names, for the error message)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check is replaced by fsmeta's limit, from the same header.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im:
            check_pixels(path, *im.size, getattr(im, "n_frames", 1) if im.format != "PNG" else 1)
            im.load()
            mode = im.mode
            if mode == "P":
                # A palette image: label masks keep their indices, pictures become RGB(A).
                arr = np.asarray(im)
                if not _palette_is_grey(im):
                    arr = np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
            elif mode == "1":
                # 1-bit PNGs (3 of the 20 ssTEM masks) read as 0/255 like every other 8-bit mask,
                # so a "> 127" rule cannot silently empty them.
                arr = np.asarray(im, dtype=np.uint8) * np.uint8(255)
            elif mode in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("RGB"))
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path} is not a readable {kind} (corrupt or truncated): {exc}") from None
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype == np.int32 and arr.size and arr.min() >= 0 and arr.max() < 65536:
        arr = arr.astype(np.uint16)  # 16-bit PNGs open as 32-bit "I" in some Pillow versions
    return np.ascontiguousarray(arr)


def _palette_is_grey(im) -> bool:
    pal = im.getpalette() or []
    rgb = np.asarray(pal[: 3 * 256], dtype=np.int32).reshape(-1, 3)
    return bool(rgb.size) and bool((rgb == np.arange(len(rgb))[:, None]).all())


# ---------------------------------------------------------------- conversion


def to_grey(plane: np.ndarray, colour: str = "grey", where: str = "image") -> np.ndarray:
    """(H, W) from grey, grey+alpha, RGB or RGBA; 8-bit stays uint8, other depths become float32.

    ``colour`` is the channel (:mod:`fsmeta.data.colour`): ``grey`` (luminance) or
    ``haematoxylin`` (the haematoxylin stain of an RGB image alone; a grey image raises)."""
    if colour != "grey":
        from fsmeta.data.colour import haematoxylin_grey

        if colour != "haematoxylin":
            raise ValueError(f"colour must be 'grey' or 'haematoxylin' here, got {colour!r}")
        return haematoxylin_grey(plane, where)
    if plane.ndim == 2:
        return plane
    if plane.shape[-1] == 2:  # grey + alpha
        return plane[..., 0]
    rgb = plane[..., :3].astype(np.float32)
    grey = rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)
    if plane.dtype == np.uint8:
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return grey


def image_to_unit(plane: np.ndarray, where: str = "image", colour: str = "grey") -> np.ndarray:
    """A grey image ready for a store: uint8 kept as is (read as x/255), any other depth
    scaled by its own range to float32 in [0, 1]; ``colour`` as :func:`to_grey`'s."""
    grey = to_grey(plane, colour, where)
    if grey.dtype == np.uint8:
        return grey
    if grey.dtype == np.bool_:
        return grey.astype(np.uint8) * np.uint8(255)
    x = grey.astype(np.float64)
    if not np.isfinite(x).all():
        raise DataError(f"{where} has NaN or infinite pixel values")
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        log.warning("%s is constant (every pixel %g); it becomes an all-zero image", where, lo)
        return np.zeros(grey.shape, np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def mask_to_binary(plane: np.ndarray, rule: str = "nonzero") -> np.ndarray:
    """Binary mask (H, W) uint8 {0, 1} from a binary or instance mask.

    Args:
        plane: grey (H, W), grey+alpha, or RGB(A) colour-coded instances (alpha ignored).
        rule: ``"nonzero"`` (foreground = any non-zero value), ``"half"``
            (foreground = above half the 8-bit range, > 127, for masks with stray low values) or
            ``"lossy"`` (foreground = above half the mask's commonest non-zero value: a binary mask
            saved as JPEG, 0/255 or 0/1, whose edges carry compression noise but whose objects'
            insides keep their value).
    """
    if rule not in ("nonzero", "half", "lossy"):
        raise ValueError(f"unknown mask rule {rule!r}")
    if plane.ndim == 3:
        channels = plane[..., :1] if plane.shape[-1] == 2 else plane[..., :3]
        plane = (channels != 0).any(axis=-1) if rule == "nonzero" else channels.max(axis=-1)
    if rule == "nonzero":
        fg = plane != 0
    elif rule == "half":
        fg = plane > 127
    else:
        values, counts = np.unique(plane[plane > 0], return_counts=True)
        fg = plane > values[np.argmax(counts)] / 2 if values.size else np.zeros(plane.shape, bool)
    return fg.astype(np.uint8)


def mask_rule(path: str | Path) -> str:
    """How a user's mask file becomes binary: any non-zero value, except in a lossy (JPEG) file,
    where it is above half the mask's commonest non-zero value (:func:`mask_to_binary`). (An
    annotation file is filled as 0/1, so "nonzero".)"""
    return "lossy" if Path(path).suffix.lower() in LOSSY_SUFFIXES else "nonzero"


# The classes a Cellpose _seg.npy (a pickled dict of arrays, lists, strings and numbers) needs: NumPy's array
# and scalar reconstructors, nothing that runs code. Any other class in the pickle is refused.
_NUMPY_PICKLE_NAMES = {
    (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")
} | {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 - pickle's hook
        if (module, name) in _NUMPY_PICKLE_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_npy_mask(path: str | Path) -> list[np.ndarray]:
    """The mask planes of a NumPy ``.npy`` file: a 2-D array (one plane) or 3-D (one per page) of integers or
    booleans, or a Cellpose ``_seg.npy`` (a pickled dict), whose ``masks`` entry is used.

    The pickle of a ``_seg.npy`` is read with NumPy's array classes only, so a file cannot run code;
    a class outside them is a :class:`DataError` naming it and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DataError(f"{path} is a .npy file of format version {version[0]}.{version[1]}, which fsmeta does not read")
            if dtype.hasobject:
                try:
                    data = _NumpyOnlyUnpickler(f).load()
                except pickle.UnpicklingError as exc:
                    raise DataError(f"{path} holds a Python object of class {exc} that fsmeta does not load (it reads "
                                    "NumPy arrays only, so a file cannot run code); save the masks as PNG or TIFF") from None
                content = data.item() if isinstance(data, np.ndarray) and data.shape == () else data
                if not isinstance(content, dict) or "masks" not in content:
                    raise DataError(f"{path} holds pickled objects but no Cellpose 'masks' entry; fsmeta reads a .npy "
                                    "of a mask array or a Cellpose _seg.npy")
                array = np.asarray(content["masks"])
            else:
                f.seek(0)
                check_pixels(path, *(tuple(shape[-1:-3:-1]) if len(shape) >= 2 else (0, 0)),
                             pages=int(np.prod(shape[:-2])) if len(shape) > 2 else 1)
                array = np.load(f, allow_pickle=False)
    except DataError:
        raise
    except Exception as exc:  # a damaged header or truncated data: numpy raises ValueError/EOFError/...
        raise DataError(f"{path} is not a readable .npy file ({exc})") from None
    if array.dtype.kind not in "biu" or array.ndim not in (2, 3):
        raise DataError(f"{path} holds a {array.dtype} array of shape {array.shape}; a mask is a 2-D array (or 3-D, one "
                        "plane per page) of integer labels or booleans")
    check_pixels(path, array.shape[-1], array.shape[-2], array.shape[0] if array.ndim == 3 else 1)
    return list(array) if array.ndim == 3 else [array]


# ---------------------------------------------------------------- listing and pairing


def list_images(folder: str | Path, what: str = "image", annotations: bool = False) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`) of a folder (not recursive), sorted by name; with
    ``annotations`` (a folder of masks), also its NumPy masks (``.npy``), ImageJ ROI sets, GeoJSON/COCO files and
    ImageScope XML (:data:`fsmeta.data.annotations.ANNOTATION_SUFFIXES`).

    Hidden files and operating-system clutter are ignored; any other file is an
    error naming it, as is an empty folder.
    """
    from fsmeta.data.annotations import ANNOTATION_SUFFIXES

    accepted = IMAGE_SUFFIXES + ((NPY_SUFFIX,) + ANNOTATION_SUFFIXES if annotations else ())
    kinds = "TIFF, PNG, JPEG or BMP images" + (", NumPy masks, ImageJ ROI sets, GeoJSON/COCO files or ImageScope XML" if annotations else "")
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what} folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    files, others = [], []
    for p in _entries(folder):
        if not p.is_dir():
            (files if p.suffix.lower() in accepted else others).append(p)
    if others:
        raise DataError(
            f"{what} folder {folder} holds file(s) that are not {kinds}: {_names(p.name for p in others)} "
            f"(fsmeta reads {', '.join(accepted)}; move other files out)"
        )
    if not files:
        raise DataError(f"{what} folder {folder} is empty: no {', '.join(accepted)} files")
    return files


def _key(stem: str) -> str:
    return stem.lower()


def mask_keys(stem: str) -> list[str]:
    """Keys a mask file stem may pair by: itself, then without a mask suffix."""
    keys = [_key(stem)]
    stripped = _MASK_SUFFIX_RE.sub("", stem)
    if stripped and stripped != stem:
        keys.append(_key(stripped))
    return keys


def pair_by_name(images: list[Path], masks: list[Path]) -> list[tuple[Path, Path]]:
    """Pair image and mask files by stem (see the module docstring for the rule).

    Raises one :class:`DataError` naming every image without a mask, every mask
    without an image, and every ambiguous name.
    """
    by_key: dict[str, Path] = {}
    by_short: dict[str, list[Path]] = {}  # images by their stem without an image suffix (000_img → 000)
    clashes = []
    for p in images:
        k = _key(p.stem)
        if k in by_key:
            clashes.append(f"{by_key[k].name} and {p.name}")
        by_key[k] = p
        short = _IMAGE_SUFFIX_RE.sub("", p.stem)
        if short and short != p.stem:
            by_short.setdefault(_key(short), []).append(p)
    paired: dict[Path, Path] = {}
    orphans = []
    for m in masks:
        keys = mask_keys(m.stem)
        hit = next((by_key[k] for k in keys if k in by_key), None)
        if hit is None:
            found = next((by_short[k] for k in keys if k in by_short), [])
            if len(found) > 1:
                clashes.append(f"{' and '.join(p.name for p in found)} (both images of {m.name})")
                continue
            hit = found[0] if found else None
        if hit is None:
            orphans.append(m)
        elif hit in paired:
            clashes.append(f"{paired[hit].name} and {m.name} (both masks of {hit.name})")
        else:
            paired[hit] = m
    lonely = [p for p in images if p not in paired]
    problems = []
    if clashes:
        problems.append(f"ambiguous names: {_names(clashes)}")
    if lonely:
        problems.append(f"{len(lonely)} image(s) without a mask: {_names(p.name for p in lonely)}")
    if orphans:
        problems.append(f"{len(orphans)} mask(s) without an image: {_names(m.name for m in orphans)}")
        if any(m.stem.lower() == "roiset" for m in orphans):
            problems.append("RoiSet.zip is Fiji's default name for a ROI set: rename it after its image (cell01.tif → "
                            "cell01.zip or cell01_RoiSet.zip)")
    if problems:
        folder_i = images[0].parent if images else "?"
        folder_m = masks[0].parent if masks else "?"
        raise DataError(
            f"images in {folder_i} and masks in {folder_m} do not pair by name; " + "; ".join(problems)
            + f". A mask pairs with the image of the same name, optionally ending in _{'/_'.join(MASK_SUFFIXES[:5])}/… "
            f"(and the image's name may end in _{'/_'.join(IMAGE_NAME_SUFFIXES)})"
        )
    return [(p, paired[p]) for p in images]


# ---------------------------------------------------------------- a user's folders


@dataclass
class PairedPlane:
    """One image/mask pair as it will be stored."""

    id: str
    image: np.ndarray  # uint8, or float32 in [0, 1]
    mask: np.ndarray  # uint8 {0, 1}
    source: str


def _read_pair(image_path: Path, mask_path: Path, colour: str = "grey") -> list[PairedPlane]:
    from fsmeta.data.annotations import is_annotation, read_annotation

    planes = read_planes(image_path)
    shared = _key(image_path.stem) not in mask_keys(mask_path.stem)  # a COCO file, say: the warnings name the image too
    if is_annotation(mask_path):
        h, w = planes[0].shape[:2]
        if any(p.shape[:2] != (h, w) for p in planes):
            raise DataError(f"{image_path}'s pages differ in size, so the outlines of {mask_path} cannot be placed")
        mplanes = read_annotation(mask_path, h, w, len(planes), image=str(image_path))
    elif mask_path.suffix.lower() == NPY_SUFFIX:
        mplanes = read_npy_mask(mask_path)
    elif mask_path.is_dir():
        h, w = planes[0].shape[:2]
        if len(planes) > 1:
            raise DataError(f"{image_path} is a stack of {len(planes)} pages; a folder of object masks ({mask_path}) "
                            "annotates one plane")
        mplanes = [read_object_masks(mask_path, h, w)]
    else:
        mplanes = read_planes(mask_path)
    if len(planes) != len(mplanes):
        raise DataError(f"{mask_path} has {len(mplanes)} page(s) but {image_path} has {len(planes)}")
    out = []
    for k, (img, m) in enumerate(zip(planes, mplanes)):
        where = f"{image_path}" + (f" page {k}" if len(planes) > 1 else "")
        if img.shape[:2] != m.shape[:2]:
            raise DataError(
                f"{mask_path}{f' page {k}' if len(planes) > 1 else ''} is {m.shape[1]}×{m.shape[0]} "
                f"but {where} is {img.shape[1]}×{img.shape[0]}"
            )
        mask = mask_to_binary(m, mask_rule(mask_path))
        named = f"{mask_path}'s mask of {image_path.name}" if shared else str(mask_path)
        if not mask.any():
            log.warning("%s has no foreground pixels; its weighted BCE uses w = 1", named)
        elif mask.all():
            log.warning("%s is foreground everywhere: the weighted BCE gives it weight 0 and nothing is "
                        "learned from it; check the mask (inverted?)", named)
        ident = image_path.stem + (f"-p{k:03d}" if len(planes) > 1 else "")
        out.append(PairedPlane(ident, image_to_unit(img, where, colour), mask, f"{image_path}:{mask_path}" + (f"#{k}" if len(planes) > 1 else "")))
    return out


def is_mask_name(path: str | Path) -> bool:
    """Whether a file is named as a mask: its stem ends in one of :data:`MASK_SUFFIXES` (``cell01_mask``,
    ``000_masks``), or it is a NumPy mask or an annotation file (an ImageJ ROI set or GeoJSON,
    :data:`fsmeta.data.annotations.ANNOTATION_SUFFIXES`)."""
    from fsmeta.data.annotations import is_annotation

    return bool(_MASK_SUFFIX_RE.search(Path(path).stem)) or is_annotation(path) or Path(path).suffix.lower() == NPY_SUFFIX


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name.lower() not in _SYSTEM_FILES)


def read_object_masks(folder: str | Path, height: int, width: int) -> np.ndarray:
    """The union of a folder of one-object masks (Kaggle's Data Science Bowl 2018 / BBBC038 layout: one
    binary image per nucleus) as a (height, width) uint8 {0, 1} mask; an empty folder is an image
    without objects. Every file must be a single image of the paired image's size."""
    folder = Path(folder)
    union = np.zeros((height, width), np.uint8)
    files = _entries(folder)
    others = [p for p in files if p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise DataError(f"object mask folder {folder} holds {_names(p.name for p in others)}, which are not mask images "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    for path in files:
        planes = read_planes(path)
        if len(planes) != 1:
            raise DataError(f"{path} is a stack of {len(planes)} pages; an object mask is one plane")
        if planes[0].shape[:2] != (height, width):
            raise DataError(f"{path} is {planes[0].shape[1]}×{planes[0].shape[0]} but its image is {width}×{height}")
        union |= mask_to_binary(planes[0], mask_rule(path))
    return union


def _object_mask_layout(folder: Path) -> list[tuple[Path, Path]] | None:
    """Kaggle's Data Science Bowl 2018 layout (BBBC038): ``folder/ID/images/ID.png`` with its nuclei in
    ``folder/ID/masks/*.png``, one file per nucleus; None when ``folder`` is not laid out so."""
    subs = [p for p in _entries(folder) if p.is_dir()]
    cases = [d for d in subs if (d / "images").is_dir() and (d / "masks").is_dir()]
    if not cases:
        return None
    odd = [d.name for d in subs if d not in cases]
    if odd:
        raise DataError(f"{folder} is laid out as ID/images + ID/masks (Data Science Bowl 2018) but "
                        f"{_names(odd)} hold(s) no images/ and masks/ folders")
    pairs = []
    for d in cases:
        images = list_images(d / "images", "image")
        if len(images) != 1:
            raise DataError(f"{d / 'images'} holds {len(images)} images; in this layout it holds its case's one image")
        pairs.append((images[0], d / "masks"))
    return pairs


def _coco_file(masks: list[Path]) -> Path | None:
    """The COCO file among a mask folder's files, when it is the folder's one annotation (None when no
    ``.json`` there is COCO); a COCO file beside per-image masks is an error."""
    from fsmeta.data.annotations import GEOJSON_SUFFIXES, _coco_or_none

    found = []
    for m in masks:
        if m.suffix.lower() in GEOJSON_SUFFIXES:
            try:
                if _coco_or_none(m) is None:
                    continue  # GeoJSON: a mask of its own image
            except DataError:
                continue  # not JSON, or malformed COCO: named when it is read as its image's mask
            found.append(m)
    if not found:
        return None
    if len(masks) > 1:
        raise DataError(f"{found[0]} is a COCO file, which annotates many images, but it lies beside "
                        f"{len(masks) - 1} other mask file(s) ({_names(m.name for m in masks if m != found[0])}); "
                        "give the COCO file alone (--masks FILE) or per-image masks")
    return found[0]


def _coco_pairs(images: list[Path], coco: Path) -> list[tuple[Path, Path]]:
    """Each image paired with the COCO file that lists it; an error naming every image it does not list."""
    from fsmeta.data.annotations import coco_index

    index = coco_index(coco)
    listed = index.names()
    lonely = [p for p in images if p.name.lower() not in listed]
    if lonely:
        raise DataError(f"{coco} annotates no image named {_names(p.name for p in lonely)} ({len(lonely)} of the "
                        f"{len(images)} image(s) in {images[0].parent}); move the images it does not annotate out of the folder")
    if len(listed) > len(images):
        log.info("%s lists %d image(s); the %d in %s are read", coco, len(listed), len(images), images[0].parent)
    return [(p, coco) for p in images]


def _pair_files(images: list[Path], masks: list[Path]) -> list[tuple[Path, Path]]:
    """Images with their mask files: every image with the folder's one COCO file, else by name."""
    coco = _coco_file(masks)
    return _coco_pairs(images, coco) if coco else pair_by_name(images, masks)


def scan_pairs(images_dir: str | Path, masks_dir: str | Path) -> list[tuple[Path, Path]]:
    """List and pair a user's folders; raises naming every unpaired file.

    ``images_dir`` and ``masks_dir`` may be one folder (Cellpose's layout: ``000_img.png`` beside
    ``000_masks.png``; or Fiji's ``cell01.tif`` beside ``cell01.zip``): then the files named as masks
    (:func:`is_mask_name`) are the masks and the others the images. A mask may be an ImageJ ROI set or a
    GeoJSON file (:func:`fsmeta.data.annotations.read_annotation`). ``masks_dir`` may also be one COCO
    file (or a folder holding only that file, or the image folder holding it, as Roboflow exports): then
    every image pairs with it (:func:`fsmeta.data.annotations.coco_index`). A mask may be a folder of
    one-object masks (:func:`read_object_masks`): ``masks_dir`` holding a folder per image named like
    it, or one folder given as both, laid out as the Data Science Bowl 2018's ``ID/images/ID.png`` +
    ``ID/masks/*.png``."""
    same = Path(images_dir).resolve() == Path(masks_dir).resolve()
    nested = _object_mask_layout(Path(images_dir)) if same and Path(images_dir).is_dir() else None
    folders = _entries(Path(masks_dir)) if Path(masks_dir).is_dir() and not same else []
    if nested is not None:
        pairs = nested
    elif folders and all(p.is_dir() for p in folders):
        # a folder per image, of one mask per object, named like the image
        pairs = pair_by_name(list_images(images_dir, "image"), folders)
    elif Path(masks_dir).is_file():
        from fsmeta.data.annotations import coco_index

        coco_index(masks_dir)  # a file given as the masks must be COCO: the error says what it is instead
        files = list_images(images_dir, "image", annotations=True)
        images = [p for p in files if not is_mask_name(p)]
        if not images:
            raise DataError(f"image folder {images_dir} holds no image, only annotation files")
        pairs = _coco_pairs(images, Path(masks_dir))
    elif same:
        files = list_images(images_dir, "image", annotations=True)
        images, masks = [p for p in files if not is_mask_name(p)], [p for p in files if is_mask_name(p)]
        if not masks:
            raise DataError(f"{images_dir} is given as both the image and the mask folder but no file in it is named "
                            f"as a mask (ending in _{'/_'.join(MASK_SUFFIXES[:5])}/…)")
        if not images:
            raise DataError(f"{images_dir} is given as both the image and the mask folder but every file in it is "
                            "named as a mask")
        pairs = _pair_files(images, masks)
    else:
        pairs = _pair_files(list_images(images_dir, "image"), list_images(masks_dir, "mask", annotations=True))
    lossy = [m for _, m in pairs if mask_rule(m) == "lossy"]
    if lossy:
        log.warning("%d of %d mask(s) in %s are JPEG (lossy; e.g. %s): foreground is read as above half of each "
                    "mask's commonest non-zero value, which suits a binary mask but not instance labels; save masks as PNG or "
                    "TIFF to keep them exact", len(lossy), len(pairs), masks_dir, lossy[0].name)
    return pairs


def iter_folder_pairs(pairs: list[tuple[Path, Path]], colour: str = "grey") -> Iterator[PairedPlane]:
    for image_path, mask_path in pairs:
        yield from _read_pair(image_path, mask_path, colour)


def folder_colour(colour: str, images: list[Path], where: str) -> tuple[str, str]:
    """The channel of a folder's images: ``colour``, or for ``auto`` the decision of
    :func:`fsmeta.data.colour.choose_colour` on an even sample of them (first page of each);
    returns (channel, reason)."""
    from fsmeta.data.colour import resolve_colour, sample_positions

    def sample() -> list[np.ndarray]:
        planes = []
        for k in sample_positions(len(images)):
            try:
                planes.append(read_planes(images[k])[0])
            except DataError:
                continue  # an unreadable file is named by the full check that follows
        return planes

    return resolve_colour(colour, sample, where)


def check_folder_pairs(pairs: list[tuple[Path, Path]], colour: str = "grey") -> str:
    """Read every pair once, collecting every unreadable or mismatched file into one error.

    Returns the store dtype the pairs need: "uint8" when every image is 8-bit, else "float32".
    """
    errors, dtype = [], "uint8"
    for image_path, mask_path in pairs:
        try:
            for plane in _read_pair(image_path, mask_path, colour):
                if plane.image.dtype != np.uint8:
                    dtype = "float32"
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        head = "\n  ".join(errors[:_LISTED])
        more = f"\n  … and {len(errors) - _LISTED} more" if len(errors) > _LISTED else ""
        raise DataError(f"{len(errors)} of {len(pairs)} image/mask pair(s) cannot be used:\n  {head}{more}")
    return dtype


def _as_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    return image if str(image.dtype) == dtype else to_unit_float(image)


def load_folder(images_dir: str | Path, masks_dir: str | Path, name: str = "support", colour: str = "auto") -> ImageSet:
    """A user's annotated folders as an in-memory :class:`ImageSet` (for fine-tuning without a store);
    its ``meta`` records the channel (``colour``, ``colour_reason``; ``auto`` decided from the images)."""
    pairs = scan_pairs(images_dir, masks_dir)
    channel, reason = folder_colour(colour, [p for p, _ in pairs], str(images_dir))
    dtype = check_folder_pairs(pairs, channel)
    planes = list(iter_folder_pairs(pairs, channel))
    return ImageSet(
        name=name,
        ids=[p.id for p in planes],
        images=[_as_dtype(p.image, dtype) for p in planes],
        masks=[p.mask for p in planes],
        splits=["train"] * len(planes),
        sources=[p.source for p in planes],
        meta={"kind": "folder", "images_dir": str(images_dir), "masks_dir": str(masks_dir), "colour": channel,
              "colour_reason": reason},
    )


def import_folder(root: str | Path, name: str, images_dir: str | Path, masks_dir: str | Path,
                  colour: str = "auto") -> Path:
    """Import a user's images and masks into the store ``root/name`` (kind "imported").

    Every file is checked before anything is written, so a bad folder leaves no
    store behind and one error names every bad file. ``colour`` is the channel colour
    images become (:mod:`fsmeta.data.colour`; ``auto`` decides from the images); the
    store records it.
    """
    from fsmeta.data import synth

    if name in synth.DOMAINS:
        raise DataError(f"{name!r} is the name of a synthetic domain; choose another name for imported data")
    pairs = scan_pairs(images_dir, masks_dir)
    channel, reason = folder_colour(colour, [p for p, _ in pairs], str(images_dir))
    dtype = check_folder_pairs(pairs, channel)
    records = (
        Record(id=p.id, image=_as_dtype(p.image, dtype), mask=p.mask, split="train", source=p.source)
        for p in iter_folder_pairs(pairs, channel)
    )
    return write_store(
        root, name, records, kind="imported", image_dtype=dtype,
        extra_meta={"colour": channel, "colour_reason": reason, "provenance": {"images_dir": str(Path(images_dir).resolve()), "masks_dir": str(Path(masks_dir).resolve()),
                                   "files": len(pairs)}},
    )


def support_crop_index(images: ImageSet, crop_size: int, stride: int, min_foreground: int,
                       subset: list[int] | np.ndarray | None = None, cover: bool = False):
    """Training crops of support images (those in ``subset``, default all): ``crop_size`` windows at ``stride``
    (``cover``: and flush with the far edges, ``finetune.cover_edges``).

    Images smaller than the crop are common in a lab's own data; then the crop shrinks to the
    smallest image side (:func:`fsmeta.data.crops.fitted_crop`).
    Returns (crop index, a note for the user or ""). Raises :class:`DataError`
    when no window has enough foreground.
    """
    from fsmeta.data.crops import build_crop_index, fitted_crop

    size, minimum, note = fitted_crop(images, crop_size, min_foreground, subset, what="support image")
    try:
        return build_crop_index(images, size, stride, minimum, subset=subset, cover=cover), note
    except DataError:
        raise DataError(
            f"no {size}×{size} window of the support images in {images.meta.get('images_dir', images.name)} has "
            f"{minimum} foreground pixels; annotate more cells or lower the threshold, e.g. --set data.min_foreground={max(1, minimum // 4)}"
        ) from None
