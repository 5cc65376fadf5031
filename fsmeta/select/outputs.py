"""``fsmeta select`` for a user: rank a target's images or patches and hand the best to an annotator.

Writes, under the output folder, each atomically (a temporary name, then a rename):

``ranking.csv``       every candidate: rank, item, image, y, x, height, width, score, selected,
                      predicted_foreground (θ′'s share of foreground pixels in the item)
``to_annotate/``      the selected whole images (the original files, copied unchanged) or
                      patches (cut from the original file in its own bit depth and colour:
                      8-bit → PNG, anything else → TIFF), named ``STEM_yY_xX``
``contact_sheet.png`` thumbnails of the selection with rank and score
``pretext.safetensors`` the pretext model θ′ the ranking came from (not for ``random``), the
                      paper's starting point for fine-tuning on the annotations

A target is a prepared data set (by name) or a folder of unlabelled TIFF, PNG, JPEG or BMP images.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsmeta.atomic import atomic_write_bytes, path_inside, sweep_stale
from fsmeta.config import ComputeConfig, Config
from fsmeta.data.store import ImageSet, check_name
from fsmeta.errors import DataError, FsmetaError
from fsmeta.models import SegmentationModel
from fsmeta.select.selection import Selection, check_budget, item_name, select_support

log = logging.getLogger(__name__)

CONTACT_SHEET_MAX = 48  # thumbnails on the sheet; the CSV lists everything


@dataclass
class Target:
    """Images to select from, and where each came from (a file, or a store row)."""

    images: ImageSet
    files: list[Path] | None  # one per image for a folder target; None for a prepared data set


def read_unlabelled_folder(folder: str | Path, colour: str = "auto") -> Target:
    """Every image file of ``folder`` (not recursive) as an unlabelled ImageSet.

    8-bit images stay uint8; other depths are scaled by their own range; colour
    becomes one channel as ``colour`` says (:mod:`fsmeta.data.colour`; ``auto`` decides
    from the images, and the set's ``meta`` records it). Masks are all zero: nothing is
    annotated yet.
    """
    from fsmeta.data.io import folder_colour, image_to_unit, list_images, read_image

    files = list_images(folder, "image")
    channel, reason = folder_colour(colour, files, str(folder))
    arrays = [image_to_unit(read_image(p), where=str(p), colour=channel) for p in files]
    ids = [check_name(p.stem, f"image name (from {p})") for p in files]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"{folder}: several files share the name {dup[0]!r} (e.g. .tif and .png); keep one")
    images = ImageSet(
        name=Path(folder).resolve().name,
        ids=ids,
        images=arrays,
        masks=[np.zeros(a.shape, np.uint8) for a in arrays],
        splits=["pool"] * len(files),
        sources=[str(p) for p in files],
        meta={"kind": "folder", "colour": channel, "colour_reason": reason},
    )
    return Target(images, list(files))


def load_target(name_or_dir: str, cfg: Config) -> Target:
    """A folder of images if ``name_or_dir`` is a folder, else a prepared data set by name."""
    if Path(name_or_dir).is_dir():
        return read_unlabelled_folder(name_or_dir, cfg.data.colour)
    if any(sep in name_or_dir for sep in ("/", os.sep)):
        raise DataError(f"target folder {name_or_dir} does not exist")
    from fsmeta.data.registry import load_dataset

    return Target(load_dataset(name_or_dir, cfg), None)


# A selection whose predicted foreground is below this share of the pool's gets a warning:
# on TNBC and EM the consistency score picked empty background first (docs/results.md).
BACKGROUND_WARNING_RATIO = 0.5


def predicted_foreground(model: SegmentationModel, images: ImageSet, selection: Selection,
                         compute: ComputeConfig | None = None) -> list[float]:
    """The share of each ranked item's pixels that ``model`` (θ′) predicts as foreground (p > 0.5),
    in ranking order; one tiled pass over each image of the pool."""
    from fsmeta.predict import predict_tiled

    masks = {i: predict_tiled(model, images.image(i), compute=compute) > 0.5
             for i in sorted({it.image for it in selection.ranking})}
    return [float(masks[it.image][it.y : it.y + it.height, it.x : it.x + it.width].mean()) for it in selection.ranking]


def ranking_csv(images: ImageSet, selection: Selection, foreground: list[float] | None = None) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "item", "image", "y", "x", "height", "width", "score", "selected",
                *(["predicted_foreground"] if foreground is not None else [])])
    for r, it in enumerate(selection.ranking, 1):
        w.writerow([r, item_name(images, it, selection.unit), images.ids[it.image], it.y, it.x, it.height, it.width,
                    f"{it.score:.6g}", int(r <= selection.budget),
                    *([f"{foreground[r - 1]:.4f}"] if foreground is not None else [])])
    return buf.getvalue().encode()


def _write_array(path_stem: Path, array: np.ndarray) -> Path:
    """8-bit grey/RGB(A) → PNG; anything else → TIFF (lossless in its own dtype)."""
    if array.dtype == np.uint8 and (array.ndim == 2 or array.shape[-1] in (3, 4)):
        from PIL import Image

        path = path_stem.with_suffix(".png")
        Image.fromarray(np.ascontiguousarray(array)).save(path)
    else:
        import tifffile

        path = path_stem.with_suffix(".tif")
        tifffile.imwrite(path, np.ascontiguousarray(array))
    return path


def _write_to_annotate(target: Target, selection: Selection, folder: Path) -> list[Path]:
    """Fill a temporary folder and rename it to ``folder`` (replacing an old one)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):
        sweep_stale(folder.parent, f".{folder.name}.{kind}-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    written = []
    try:
        originals: dict[int, np.ndarray] = {}
        images = target.images
        # By image, so a folder target's original file is read once.
        for it in sorted(selection.selected, key=lambda t: (t.image, t.y, t.x)):
            if target.files is not None and selection.unit == "image":
                dst = path_inside(tmp, target.files[it.image].name)
                shutil.copyfile(target.files[it.image], dst)
                written.append(dst)
                continue
            if target.files is not None:
                if it.image not in originals:
                    from fsmeta.data.io import read_image

                    originals = {it.image: read_image(target.files[it.image])}  # one original in memory at a time
                raw = originals[it.image]
            else:
                raw = images.images[it.image]
            stem = images.ids[it.image] if selection.unit == "image" else f"{images.ids[it.image]}_y{it.y}_x{it.x}"
            written.append(_write_array(path_inside(tmp, stem), raw[it.y : it.y + it.height, it.x : it.x + it.width]))
        os.chmod(tmp, 0o755)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-{os.getpid()}-", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [folder / p.name for p in written]


def contact_sheet(images: ImageSet, selection: Selection) -> bytes:
    """PNG bytes: the selected items (up to 48) in rank order, titled with rank, name and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = selection.selected[:CONTACT_SHEET_MAX]
    cols = min(6, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, it) in enumerate(zip(axes.flat, items), 1):
        ax.imshow(images.image(it.image)[it.y : it.y + it.height, it.x : it.x + it.width], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"#{k} {item_name(images, it, selection.unit)}\nscore {it.score:.4g}", fontsize=7)
    more = f" (first {CONTACT_SHEET_MAX} of {selection.budget})" if selection.budget > CONTACT_SHEET_MAX else ""
    fig.suptitle(f"{images.name}: {selection.method} selection, {selection.budget} {selection.unit}(s){more}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


@dataclass
class SelectReport:
    selection: Selection
    names: list[str]  # the selected items' names, best first (as in ranking.csv)
    ranking: Path
    to_annotate: list[Path]
    contact_sheet: Path
    pretext: Path | None = None  # θ′, when a pretext fine-tune ran (every method but random)
    # θ′'s predicted foreground share of the selected pixels and of the whole pool's candidates
    selected_foreground: float = 0.0
    pool_foreground: float = 0.0

    @property
    def mostly_background(self) -> bool:
        """The selection holds far less of what θ′ sees as foreground than the pool does."""
        return self.pool_foreground > 0 and self.selected_foreground < BACKGROUND_WARNING_RATIO * self.pool_foreground


def select_for_annotation(
    weights: str | Path,
    target: str,
    cfg: Config,
    budget: int,
    out: str | Path,
    *,
    method: str | None = None,
    unit: str | None = None,
    gamma: float | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SelectReport:
    """The whole user command: load, pretext, score every image (or patch) of the target, write the outputs.

    ``method``/``unit`` default to ``select.method``/``select.unit``; ``gamma`` to
    the configured γ. The whole target is the pool: a user's images are all unlabelled.
    """
    from fsmeta.checkpoint import Kind, describe_adapted, model_from_checkpoint, save_checkpoint
    from fsmeta.models import clone_state
    from fsmeta.select.pretext import pretext_finetune, resolve_gamma, resolve_polarity

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FsmetaError(f"output {out} exists and is not a folder")
    model, meta = model_from_checkpoint(weights)
    if meta.get("kind") == Kind.FINETUNED.value:
        log.warning("%s is already fine-tuned; selection usually starts from pre-trained weights", weights)
    tgt = load_target(target, cfg)
    method = method or cfg.select.method
    check_budget(tgt.images, range(len(tgt.images)), budget, unit or cfg.select.unit, cfg)  # before the pretext trains
    pretext = None
    if method != "random" and cfg.select.pretext_epochs > 0:
        # θ′ on pseudo-labels of the whole target (a user's images are all pool), kept for `fsmeta finetune`:
        # the 2023 method fine-tunes θ′, not θ, on the annotations.
        model = pretext_finetune(model, tgt.images, cfg, seed, gamma=gamma, progress=progress)
        pretext = save_checkpoint(out / "pretext.safetensors", clone_state(model), describe_adapted(
            Kind.PRETEXT, meta, weights=str(weights), target=str(target), seed=seed,
            gamma=resolve_gamma(cfg, tgt.images.name, gamma), polarity=resolve_polarity(cfg, tgt.images)[0],
            colour=str(tgt.images.meta.get("colour") or "grey"),
            config=cfg.to_dict()))
    selection = select_support(model, tgt.images, range(len(tgt.images)), budget, method,
                               unit or cfg.select.unit, cfg, seed, gamma=gamma, run_pretext=False, progress=progress)
    foreground = predicted_foreground(model, tgt.images, selection, cfg.compute)
    pixels = np.array([it.height * it.width for it in selection.ranking], dtype=np.float64)
    share = np.asarray(foreground) * pixels
    n = selection.budget
    selected_fg, pool_fg = float(share[:n].sum() / pixels[:n].sum()), float(share.sum() / pixels.sum())
    to_annotate = _write_to_annotate(tgt, selection, out / "to_annotate")
    ranking = out / "ranking.csv"
    atomic_write_bytes(ranking, ranking_csv(tgt.images, selection, foreground))
    sheet = out / "contact_sheet.png"
    atomic_write_bytes(sheet, contact_sheet(tgt.images, selection))
    names = [item_name(tgt.images, it, selection.unit) for it in selection.selected]
    return SelectReport(selection, names, ranking, to_annotate, sheet, pretext, selected_fg, pool_fg)
