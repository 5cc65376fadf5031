"""Preparers for the five public data sets of the few-shot protocol (SPEC §3.1).

Each reads the public download as it unpacks, from a folder the user already has
(``--from``) or after :func:`download` (``--download``), checks it (pair counts,
image shapes and bit depths, every image paired with its mask by name) and
streams it into a store of kind ``"public"``. Pairing and counts are checked
before the first record is written; a file found wrong while streaming is
collected, the rest are still checked, and one error names them all. Either way
``write_store`` discards its temporary folder, so a failed prepare leaves no
partial store.

=========  ====================================================================
``b5``     BBBC005: the 1,200 in-focus (``_F1_``) 8-bit 696×520 TIFs of
           ``BBBC005_v1_images/``, each with the TIF of the same name in
           ``BBBC005_v1_ground_truth/``.
``b39``    BBBC039: 200 16-bit 696×520 TIFFs in ``images/``, scaled by each
           image's own range to float32 [0, 1]; instance masks ``masks/*.png``
           (RGBA) → foreground where any colour channel is non-zero. The
           official split is used when ``metadata/{training,validation,test}.txt``
           is present, else every image is ``train``.
``sstem``  ssTEM (Drosophila VNC): 20 ``stack1/raw/NN.tif`` with
           ``stack1/mitochondria/NN.png > 127`` (1024×1024).
``em``     EPFL hippocampus: the 165 slices of ``training.tif`` with
           ``training_groundtruth.tif`` (768×1024).
``tnbc``   TNBC: 50 ``Slide_XX/XX_k.png`` (RGB or RGBA → one channel, 512×512) with
           ``GT_XX/XX_k.png``.
=========  ====================================================================

RGB images become one channel as ``colour`` says (:mod:`fsmeta.data.colour`): by default
``auto``, which makes TNBC's H&E the haematoxylin stain alone and leaves grey data sets as
they are.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fsmeta.atomic import sweep_stale
from fsmeta.data.catalogue import PublicSet, public_layouts
from fsmeta.data.colour import resolve_colour, sample_positions
from fsmeta.data.io import check_pixels, mask_to_binary, pair_by_name, read_image, to_grey
from fsmeta.data.store import Record, write_store
from fsmeta.errors import DataError

log = logging.getLogger(__name__)

_LISTED = 20


# The layouts of the public data sets (fsmeta.data.catalogue), by name.
PUBLIC: dict[str, PublicSet] = public_layouts()


@dataclass
class Item:
    """One image/mask pair to read: files (and a page for stacks), relative names for messages."""

    id: str
    image: Path
    mask: Path
    page: int | None = None
    split: str = "train"


def _names(items: list[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _find_dirs(base: Path, test: Callable[[Path], bool], depth: int = 5) -> list[Path]:
    """Folders under ``base`` (itself included, ``depth`` levels down) that pass ``test``, shallowest first."""
    found, level = [], [base]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            if test(d):
                found.append(d)
            try:
                nxt.extend(sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith((".", "__MACOSX"))))
            except OSError:
                continue
        level = nxt
    return found


def _find_one(base: Path, test: Callable[[Path], bool], what: str, spec: PublicSet) -> Path:
    hits = _find_dirs(base, test)
    if not hits:
        raise DataError(f"{base} does not hold the {spec.title} download: no {what} found in it or its subfolders")
    return hits[0]


def _tif_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".tif", ".tiff") and not p.name.startswith("."))


def _png_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith("."))


def _pair_exact(images: list[Path], masks: list[Path], spec: PublicSet, where: str) -> list[tuple[Path, Path]]:
    """Pair by identical stem (case-insensitive); one error names every unpaired file."""
    try:
        return pair_by_name(images, masks)
    except DataError as exc:
        raise DataError(f"{spec.title} in {where}: {exc}") from None


def _check_count(n: int, spec: PublicSet, where: Path) -> None:
    if n != spec.pairs:
        raise DataError(f"{spec.title}: expected {spec.pairs} image/mask pairs in {where}, found {n}; is the download complete?")


# ---------------------------------------------------------------- per data set: which files pair


def _items_b5(base: Path, spec: PublicSet) -> tuple[Path, list[Item]]:
    img_dir = _find_one(base, lambda d: d.name.lower() == "bbbc005_v1_images", "BBBC005_v1_images/ folder", spec)
    gt_dir = _find_one(base, lambda d: d.name.lower() == "bbbc005_v1_ground_truth", "BBBC005_v1_ground_truth/ folder", spec)
    in_focus = re.compile(r"_F1_", re.IGNORECASE)
    images = [p for p in _tif_files(img_dir) if in_focus.search(p.stem)]
    masks = [p for p in _tif_files(gt_dir) if in_focus.search(p.stem)]
    others = [p.name for p in _tif_files(gt_dir) if not in_focus.search(p.stem)]
    if others:
        log.info("BBBC005: ignoring %d ground-truth file(s) not at focus level F1", len(others))
    pairs = _pair_exact(images, masks, spec, f"{img_dir} and {gt_dir}")
    _check_count(len(pairs), spec, img_dir)
    return img_dir.parent, [Item(i.stem, i, m) for i, m in pairs]


def _b39_split(base: Path) -> dict[str, str]:
    """Official split from ``metadata/{training,validation,test}.txt`` when present: image stem → split."""
    split: dict[str, str] = {}
    for folder in _find_dirs(base, lambda d: (d / "training.txt").is_file() and (d / "test.txt").is_file()):
        for fname, name in (("training.txt", "train"), ("validation.txt", "val"), ("test.txt", "test")):
            path = folder / fname
            if path.is_file():
                for line in path.read_text().split():
                    split[Path(line.strip()).stem.lower()] = name
        break
    return split


def _items_b39(base: Path, spec: PublicSet) -> tuple[Path, list[Item]]:
    img_dir = _find_one(base, lambda d: d.name.lower() == "images" and bool(_tif_files(d)), "images/ folder of TIFFs", spec)
    mask_dir = _find_one(base, lambda d: d.name.lower() == "masks" and bool(_png_files(d)), "masks/ folder of PNGs", spec)
    pairs = _pair_exact(_tif_files(img_dir), _png_files(mask_dir), spec, f"{img_dir} and {mask_dir}")
    _check_count(len(pairs), spec, img_dir)
    split = _b39_split(base)
    if split:
        missing = [i.name for i, _ in pairs if i.stem.lower() not in split]
        if missing:
            raise DataError(f"{spec.title}: the official split lists no split for {_names(missing)}")
    return img_dir.parent, [Item(i.stem, i, m, split=split.get(i.stem.lower(), "train")) for i, m in pairs]


def _items_sstem(base: Path, spec: PublicSet) -> tuple[Path, list[Item]]:
    stack = _find_one(base, lambda d: (d / "raw").is_dir() and (d / "mitochondria").is_dir(), "stack1/raw and stack1/mitochondria folders", spec)
    pairs = _pair_exact(_tif_files(stack / "raw"), _png_files(stack / "mitochondria"), spec, str(stack))
    _check_count(len(pairs), spec, stack)
    return stack, [Item(i.stem, i, m) for i, m in pairs]


def _items_em(base: Path, spec: PublicSet) -> tuple[Path, list[Item]]:
    import tifffile

    folder = _find_one(base, lambda d: (d / "training.tif").is_file(), "training.tif", spec)
    image, mask = folder / "training.tif", folder / "training_groundtruth.tif"
    if not mask.is_file():
        raise DataError(f"{spec.title}: {image} has no ground truth beside it ({mask.name} is missing)")
    counts = {}
    for path in (image, mask):
        try:
            with tifffile.TiffFile(path) as tif:
                counts[path] = len(tif.pages)
                check_pixels(path, tif.pages[0].imagewidth, tif.pages[0].imagelength, counts[path])
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path} is not a readable TIFF (corrupt or truncated): {exc}") from None
    if counts[image] != counts[mask]:
        raise DataError(f"{mask} has {counts[mask]} slices but {image} has {counts[image]}")
    _check_count(counts[image], spec, folder)
    return folder, [Item(f"slice-{k:03d}", image, mask, page=k) for k in range(counts[image])]


def _items_tnbc(base: Path, spec: PublicSet) -> tuple[Path, list[Item]]:
    def has_slides(d: Path) -> bool:
        return any(c.is_dir() and re.fullmatch(r"Slide_\d+", c.name) for c in d.iterdir())

    top = _find_one(base, has_slides, "Slide_XX/ folders", spec)
    slides = sorted(c for c in top.iterdir() if c.is_dir() and re.fullmatch(r"Slide_\d+", c.name))
    items, problems = [], []
    for slide in slides:
        gt = top / ("GT_" + slide.name.split("_", 1)[1])
        if not gt.is_dir():
            problems.append(f"{slide.name}/ has no {gt.name}/ folder of masks")
            continue
        try:
            pairs = pair_by_name(_png_files(slide), _png_files(gt))
        except DataError as exc:
            problems.append(f"{slide.name} vs {gt.name}: {exc}")
            continue
        items += [Item(i.stem, i, m) for i, m in pairs]
    orphan_gt = [c.name for c in top.iterdir() if c.is_dir() and re.fullmatch(r"GT_\d+", c.name)
                 and not (top / ("Slide_" + c.name.split("_", 1)[1])).is_dir()]
    if orphan_gt:
        problems.append(f"mask folder(s) without a Slide_ folder: {_names(sorted(orphan_gt))}")
    if problems:
        raise DataError(f"{spec.title} in {top}: " + "; ".join(problems))
    _check_count(len(items), spec, top)
    return top, items


# The reader of each public data set: where its pairs lie in the unpacked download.
READERS: dict[str, Callable[[Path, PublicSet], tuple[Path, list[Item]]]] = {
    "b5": _items_b5, "b39": _items_b39, "sstem": _items_sstem, "em": _items_em, "tnbc": _items_tnbc,
}


# ---------------------------------------------------------------- reading one pair


def _binary_public(mask: np.ndarray) -> np.ndarray:
    """8-bit masks saved as 0/255 (with stray low values in ssTEM): > 127; 0/1 masks: non-zero."""
    if mask.dtype == np.uint8 and mask.ndim == 2 and mask.max(initial=0) > 1:
        return mask_to_binary(mask, "half")
    return mask_to_binary(mask, "nonzero")


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _load(item: Item, spec: PublicSet, base: Path, stacks: dict[Path, Any], colour: str = "grey") -> Record:
    if item.page is None:
        raw = read_image(item.image)
        raw_mask = read_image(item.mask)
        src = _rel(item.image, base)
        where_img, where_mask = str(item.image), str(item.mask)
    else:
        raw = stacks[item.image].pages[item.page].asarray()
        raw_mask = stacks[item.mask].pages[item.page].asarray()
        src = f"{_rel(item.image, base)}#{item.page}"
        where_img, where_mask = f"{item.image} slice {item.page}", f"{item.mask} slice {item.page}"
    if str(raw.dtype) != spec.file_dtype:
        bits = {"uint8": "8-bit", "uint16": "16-bit"}
        raise DataError(f"{where_img} is {bits.get(str(raw.dtype), str(raw.dtype))}; {spec.title} images are {bits.get(spec.file_dtype, spec.file_dtype)}")
    if raw.shape[:2] != spec.shape:
        raise DataError(f"{where_img} is {raw.shape[1]}×{raw.shape[0]}, expected {spec.shape[1]}×{spec.shape[0]} for {spec.title}")
    if raw_mask.shape[:2] != raw.shape[:2]:
        raise DataError(f"{where_mask} is {raw_mask.shape[1]}×{raw_mask.shape[0]} but {where_img} is {raw.shape[1]}×{raw.shape[0]}")
    grey = to_grey(raw, colour, where_img)
    if spec.store_dtype == "float32":
        x = grey.astype(np.float64)
        lo, hi = float(x.min()), float(x.max())
        image = ((x - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros(grey.shape, np.float32)
        if hi <= lo:
            log.warning("%s is constant; stored as an all-zero image", where_img)
    else:
        image = grey.astype(np.uint8)
    mask = mask_to_binary(raw_mask, "nonzero") if spec.name == "b39" else _binary_public(raw_mask)
    if not mask.any():
        log.warning("%s has no foreground pixels; its weighted BCE uses w = 1", where_mask)
    elif mask.all():
        log.warning("%s is foreground everywhere: the weighted BCE gives it weight 0 and nothing is learned from it", where_mask)
    return Record(id=item.id, image=image, mask=mask, split=item.split, source=src)


def _records(items: list[Item], spec: PublicSet, base: Path, progress: bool, colour: str = "grey") -> Iterator[Record]:
    """Stream records, collecting bad pairs; raising at the end aborts the store write."""
    import tifffile

    from fsmeta.progress import Progress

    stacks: dict[Path, Any] = {}
    errors: list[str] = []
    bar = Progress(len(items), f"prepare {spec.name}", enabled=progress)
    try:
        for item in items:
            if item.page is not None:
                for path in (item.image, item.mask):
                    if path not in stacks:
                        stacks[path] = tifffile.TiffFile(path)
            try:
                rec = _load(item, spec, base, stacks, colour)
            except DataError as exc:
                errors.append(str(exc))
            except Exception as exc:  # a decoder failing inside a page: still the user's file
                errors.append(f"{item.image}{'' if item.page is None else f' slice {item.page}'}: unreadable ({exc})")
            else:
                if not errors:  # once one pair is bad the store is doomed; keep checking, stop writing
                    yield rec
            bar.update()
    finally:
        for tif in stacks.values():
            tif.close()
    if errors:
        head = "\n  ".join(errors[:_LISTED])
        more = f"\n  … and {len(errors) - _LISTED} more" if len(errors) > _LISTED else ""
        raise DataError(f"{spec.title}: {len(errors)} of {len(items)} pair(s) are wrong, nothing was written:\n  {head}{more}")


# ---------------------------------------------------------------- checksums


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_members(spec: PublicSet, where: str | Path, items: list[Item]) -> int:
    """Check every file ``items`` read against ``spec.member_sha256`` (by default
    :data:`fsmeta.data.checksums.MEMBER_SHA256`).

    A file whose digest differs from the recorded one stops preparing (naming the
    file and both digests) when the record is the public file's own; otherwise,
    and for files or data sets with no recorded digest, a warning says plainly that
    they are not verified. Returns how many files matched their record.
    """
    from fsmeta.data.checksums import AUTHORITATIVE, MEMBER_SHA256

    name = spec.name
    known = spec.member_sha256 if spec.member_sha256 is not None else MEMBER_SHA256.get(name, {})
    where = Path(where)
    files = sorted({p for it in items for p in (it.image, it.mask)})
    if not known:
        log.warning("%s: no checksums are known for this data set's files; its %d file(s) are not verified", name, len(files))
        return 0
    matched, unknown, differ = 0, [], []
    for path in files:
        rel = path.relative_to(where).as_posix() if path.is_relative_to(where) else path.name
        expected = known.get(rel)
        if expected is None:
            unknown.append(rel)
            continue
        actual = _sha256(path)
        if actual == expected:
            matched += 1
        else:
            differ.append(f"{path} has sha256 {actual}, expected {expected}")
    if differ and name in AUTHORITATIVE:
        raise DataError(f"{name}: {len(differ)} file(s) differ from the public data set's recorded checksums "
                        f"(tampered or damaged; nothing was written):\n  " + "\n  ".join(differ[:_LISTED]))
    if differ:
        log.warning("%s: %d file(s) match no recorded checksum (the public original's is not known, only a "
                    "re-encoded copy's), so they are not verified: %s", name, len(differ), _names([d.split(" has ")[0] for d in differ]))
    if unknown:
        log.warning("%s: no known checksum for %d file(s), not verified: %s", name, len(unknown), _names(unknown))
    return matched


# ---------------------------------------------------------------- download and unpack


def _file_name(url: str) -> str:
    return urllib.request.url2pathname(url.rstrip("/").rsplit("/", 1)[-1]).strip()


def mirror_url(url: str, mirror: str | None) -> str:
    """``url`` served from ``mirror`` (same file name), or ``url`` itself."""
    return url if not mirror else mirror.rstrip("/") + "/" + url.rstrip("/").rsplit("/", 1)[-1]


def _verify(path: Path, name: str, spec: PublicSet | None, shown: Path | str | None = None) -> None:
    """Check a downloaded file; messages call it ``shown`` (e.g. the URL or final name, not ``.part``)."""
    shown = shown or path
    size = path.stat().st_size
    if spec and name in spec.sizes and size != spec.sizes[name]:
        raise DataError(f"{shown} has {size} bytes, expected {spec.sizes[name]}")
    if spec and name in spec.sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != spec.sha256[name]:
            raise DataError(f"{shown} has sha256 {digest.hexdigest()}, expected {spec.sha256[name]}")
    elif spec:
        log.warning("%s: no known sha256 for %s; checked only for size and format, its unpacked files are "
                    "checked against fsmeta's recorded checksums where known", shown, name)
    if name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{shown} is not a valid zip archive: {exc}") from None
        if bad is not None:
            raise DataError(f"{shown}: member {bad} fails its CRC check")
    elif name.lower().endswith((".tif", ".tiff")):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                _ = len(tif.pages)
        except Exception as exc:
            raise DataError(f"{shown} is not a readable TIFF: {exc}") from None


def download(url: str, dest: str | Path, spec: PublicSet | None = None, timeout: float = 60.0, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``, resumably and checked.

    Bytes stream into ``dest.part``; a later call continues from its length with
    an HTTP Range request (starting over if the server ignores ranges). The file
    is checked (size against the server's and any known size or sha256; zip CRCs
    or TIFF structure) before it is renamed to ``dest``. An existing ``dest`` that
    passes the checks is kept.
    """
    dest = Path(dest)
    name = dest.name
    if dest.is_file():
        try:
            _verify(dest, name, spec)
            return dest
        except DataError as exc:
            log.warning("%s; downloading it again", exc)
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fsmeta", **({"Range": f"bytes={offset}-"} if offset else {})})
    total: int | None = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status = resp.status
            if offset and status == 206:
                m = re.search(r"/(\d+)$", resp.headers.get("Content-Range", ""))
                total = int(m.group(1)) if m else None
                mode = "ab"
                log.info("resuming %s at byte %d", url, offset)
            else:
                length = resp.headers.get("Content-Length")
                total = int(length) if length is not None else None
                mode, offset = "wb", 0
            with open(part, mode) as f:
                done = offset
                next_report = done + max(total // 10, 1) if total else None
                while True:
                    block = resp.read(chunk)
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    if next_report and done >= next_report:
                        log.info("%s: %d of %d MB", name, done >> 20, total >> 20)
                        next_report += max(total // 10, 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            total = offset  # the partial file already holds every byte
        else:
            raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as exc:
        have = part.stat().st_size if part.is_file() else 0
        raise DataError(f"download of {url} failed after {have} bytes ({exc}); run the same command again to resume") from None
    have = part.stat().st_size
    if total is not None and have != total:
        raise DataError(f"download of {url} stopped at {have} of {total} bytes; run the same command again to resume")
    try:
        _verify(part, name, spec, shown=f"{url} (downloaded to {dest})")
    except DataError:
        part.unlink(missing_ok=True)  # a complete but wrong file cannot be resumed into a right one
        raise
    os.replace(part, dest)
    return dest


def unpack(archive: str | Path, into: str | Path) -> Path:
    """Extract a zip into ``into/<archive stem>`` atomically (via a temporary folder); returns that folder."""
    archive, into = Path(archive), Path(into)
    final = into / f"{archive.stem}"
    if final.is_dir():
        return final
    into.mkdir(parents=True, exist_ok=True)
    sweep_stale(into, f".{archive.stem}.unpack-")  # left by a killed unpack
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.stem}.unpack-{os.getpid()}-", dir=into))
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (tmp / member).resolve()
                if not str(target).startswith(str(tmp.resolve()) + os.sep) and target != tmp.resolve():
                    raise DataError(f"{archive}: member {member!r} would unpack outside its folder; refusing it")
            zf.extractall(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def fetch(spec: PublicSet, downloads: str | Path, mirror: str | None = None) -> Path:
    """Download (or reuse) and unpack every file of ``spec`` under ``downloads``; returns that folder."""
    downloads = Path(downloads)
    for url in spec.urls + spec.optional_urls:
        source = mirror_url(url, mirror)
        try:
            path = download(source, downloads / _file_name(url), spec)
        except DataError as exc:
            if url in spec.optional_urls:
                log.warning("optional file skipped: %s", exc)
                continue
            raise
        if path.suffix.lower() == ".zip":
            unpack(path, downloads / "unpacked")
    return downloads


def _unpack_local_archives(source: Path, spec: PublicSet, downloads: Path) -> Path | None:
    """``--from`` a folder (or a zip) of the downloaded archives: unpack them and return where."""
    names = {_file_name(u) for u in spec.urls + spec.optional_urls if u.lower().endswith(".zip")}
    zips = [source] if source.is_file() and source.suffix.lower() == ".zip" else (
        [source / n for n in names if (source / n).is_file()] if source.is_dir() else [])
    if not zips:
        return None
    for z in zips:
        _verify(z, z.name, spec)
        unpack(z, downloads / "unpacked")
    return downloads / "unpacked"


# ---------------------------------------------------------------- entry point


def prepare(
    name: str,
    root: str | Path,
    source: str | Path | None = None,
    *,
    download_files: bool = False,
    mirror: str | None = None,
    downloads: str | Path | None = None,
    spec: PublicSet | None = None,
    progress: bool = True,
    colour: str = "auto",
) -> Path:
    """Prepare public data set ``name`` into ``root/name``; returns the store folder.

    Args:
        source: the unpacked download (any folder above it works), or a folder
            holding the downloaded archives; ignored with ``download_files``.
        download_files: fetch the public files first (resumable) into ``downloads``
            (default ``root/.downloads/name``), from ``mirror`` if given.
        spec: the expectations to check against (tests shrink counts and shapes).
        colour: the channel colour images become (:mod:`fsmeta.data.colour`): ``grey``,
            ``haematoxylin``, or ``auto`` (decided from an even sample of the images; the
            store records the channel and why).
    """
    if name not in PUBLIC:
        raise DataError(f"unknown public data set {name!r}; choose from {', '.join(PUBLIC)}")
    spec = spec or PUBLIC[name]
    root = Path(root)
    downloads = Path(downloads) if downloads else root / ".downloads" / name
    if download_files:
        base = fetch(spec, downloads, mirror)
    else:
        if source is None:
            raise DataError(f"give the folder of the {spec.title} download (--from PATH) or --download")
        base = Path(source)
        if not base.exists():
            raise DataError(f"{base} does not exist")
    if base.is_file():
        unpacked = _unpack_local_archives(base, spec, downloads)
        if unpacked is None:
            raise DataError(f"{base} is a file; give the folder of the {spec.title} download or its .zip archive")
        base = unpacked
    try:
        where, items = READERS[name](base, spec)
    except DataError:
        # Perhaps the folder holds the archives themselves, not yet unpacked.
        unpacked = None if download_files else _unpack_local_archives(base, spec, downloads)
        if unpacked is None:
            raise
        where, items = READERS[name](unpacked, spec)
    verified = verify_members(spec, where, items)
    channel, reason = resolve_colour(colour, lambda: _sample_planes(items), spec.title)
    provenance = {
        "dataset": spec.title,
        "verified_files": verified,
        "source": str(Path(where).resolve()),
        "pairs": len(items),
        "expected_pairs": spec.pairs,
        "urls": list(spec.urls),
        "downloaded": bool(download_files),
        "citation": spec.citation,
        "splits": {s: sum(1 for i in items if i.split == s) for s in sorted({i.split for i in items})},
    }
    return write_store(root, name, _records(items, spec, Path(where), progress, channel), kind="public",
                       image_dtype=spec.store_dtype,
                       extra_meta={"colour": channel, "colour_reason": reason, "provenance": provenance})


def _sample_planes(items: list[Item]) -> list[np.ndarray]:
    """An even sample of the images (stack slices read alone) for ``auto``'s colour decision."""
    import tifffile

    planes = []
    for k in sample_positions(len(items)):
        item = items[k]
        try:
            if item.page is None:
                planes.append(read_image(item.image))
            else:
                with tifffile.TiffFile(item.image) as tif:
                    planes.append(tif.pages[item.page].asarray())
        except Exception:  # noqa: BLE001 - an unreadable file is named by the full read that follows
            continue
    return planes


def shrunk(name: str, **changes: Any) -> PublicSet:
    """``PUBLIC[name]`` with some expectations changed (small test fixtures, mirrors with other counts);
    other files than the public ones, so no recorded checksums unless ``member_sha256`` is given."""
    return replace(PUBLIC[name], **{"member_sha256": {}, **changes})
