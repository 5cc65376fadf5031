"""Choosing what to annotate: a patch grid over the pool, scored and ranked.

Candidates are ``select.patch_size`` windows (256×256) on a grid with stride
``select.patch_stride`` (0: the data set's fine-tune stride, the paper's
overlapping grid; the user command defaults to non-overlapping tiles), fully
inside the image, over the pool images only. An image smaller than a patch is
one candidate of its own size.

``unit="patch"``: the budget counts patches; the top-|B| patches by score.
``unit="image"``: the budget counts whole images; an image's score is the
**mean of its patch scores** (``select.image_score = mean``, so large and small
images compete on the same footing) or one score of the whole image at full
resolution (``whole``).

Ranks break ties by (image, y, x), so a ranking is a pure function of the
scores. Nothing outside ``pool_indices`` is ever a candidate: a test image
cannot be selected.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from fsmeta.config import Config
from fsmeta.data.crops import CropIndex, gather, normalise
from fsmeta.data.io import support_crop_index
from fsmeta.data.store import ImageSet, to_unit_float
from fsmeta.errors import FsmetaError
from fsmeta.models import SegmentationModel
from fsmeta.progress import Progress
from fsmeta.select.scorers import SCORERS, ScoreContext, embed_patches, score_patches

UNITS = ("patch", "image")
SET_METHODS = ("typiclust", "coverage")  # choose a set from θ′'s features (fsmeta.select.diversity), not a score per candidate
BUDGETED_METHODS = ("typiclust",)  # whose choice depends on the budget (k-means with k = budget); coverage's picks are nested
_CHUNK = 256  # patches scored per call, so an image's whole grid never sits in memory at once


@dataclass(frozen=True)
class Item:
    """One candidate: a window of image ``image`` (an index into the ImageSet), with its score."""

    image: int
    y: int
    x: int
    height: int
    width: int
    score: float


@dataclass(frozen=True)
class Selection:
    """Every candidate of the pool ranked best first; the first ``budget`` are selected."""

    method: str
    unit: str
    budget: int
    ranking: tuple[Item, ...]

    @property
    def selected(self) -> tuple[Item, ...]:
        return self.ranking[: self.budget]

    def image_indices(self) -> np.ndarray:
        """Sorted distinct images that the selected items come from."""
        return np.unique(np.array([it.image for it in self.selected], dtype=np.int64))

    def annotated_pixels(self) -> int:
        return sum(it.height * it.width for it in self.selected)


def item_name(images: ImageSet, item: Item, unit: str) -> str:
    """``ID`` for a whole image, ``ID@yY_xX`` for a patch."""
    base = images.ids[item.image]
    return base if unit == "image" else f"{base}@y{item.y}_x{item.x}"


def patch_grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) of every ``size`` window fully inside the image on a ``stride`` grid
    (the grid of :func:`fsmeta.data.crops.build_crop_index`); an image smaller than
    ``size`` on a side gives windows of its own extent on that side."""
    ph, pw = min(size, height), min(size, width)
    ys = range(0, height - ph + 1, stride)
    xs = range(0, width - pw + 1, stride)
    return [(y, x, ph, pw) for y in ys for x in xs]


def patch_budget(dataset: str, shots: int, cfg: Config) -> int:
    """The paper's patch budget |B| = patches-per-shot × K (TNBC 100, EM 400, ssTEM 500, B5 100, B39 100)."""
    if shots < 1:
        raise FsmetaError(f"K must be at least 1, got {shots}")
    return int(cfg.select.lookup("patches_per_shot", dataset)) * shots


def _check_pool(images: ImageSet, pool_indices: Iterable[int], exclude: Iterable[int] | None) -> np.ndarray:
    pool = np.asarray(list(pool_indices), dtype=np.int64)
    if pool.size == 0:
        raise FsmetaError(f"the selection pool of {images.name} is empty")
    if pool.min() < 0 or pool.max() >= len(images):
        raise FsmetaError(f"pool index out of range for {images.name} ({len(images)} images): {pool.min()}..{pool.max()}")
    if len(np.unique(pool)) != len(pool):
        raise FsmetaError(f"the selection pool of {images.name} lists an image twice")
    if exclude is not None:
        clash = np.intersect1d(pool, np.asarray(list(exclude), dtype=np.int64))
        if clash.size:
            raise FsmetaError(f"the selection pool of {images.name} contains test image(s) {[images.ids[i] for i in clash[:5]]}")
    return pool


def _resolve_model(model_or_ckpt: SegmentationModel | str | Path) -> SegmentationModel:
    if isinstance(model_or_ckpt, SegmentationModel):
        return model_or_ckpt
    from fsmeta.checkpoint import model_from_checkpoint

    return model_from_checkpoint(model_or_ckpt)[0]


def candidate_grid(images: ImageSet, i: int, cfg: Config) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) of image ``i``'s candidate patches: the ``select.patch_size`` grid at
    ``select.patch_stride`` (0: the fine-tune stride), after ``select.candidate_min_foreground``."""
    sel = cfg.select
    h, w = images.images[i].shape[:2]
    stride = sel.patch_stride or cfg.data.stride(images.name, "finetune")
    grid = patch_grid(h, w, sel.patch_size, stride)
    if sel.candidate_min_foreground > 0:
        # Reads the true mask: reproduces the authors' candidate filter, off by default (see SelectConfig).
        mask = images.masks[i]
        grid = [g for g in grid if int(np.count_nonzero(mask[g[0] : g[0] + g[2], g[1] : g[1] + g[3]])) >= sel.candidate_min_foreground]
    return grid


def embed_image(model: SegmentationModel, images: ImageSet, i: int, cfg: Config, seed: int,
                whole: bool = False) -> tuple[list[tuple[int, int, int, int]], np.ndarray, np.ndarray]:
    """(windows, features, predicted foreground shares) of image ``i``'s candidate patches (or the
    whole image as one window), by :func:`fsmeta.select.scorers.embed_patches`."""
    img = images.image(i)
    ctx = ScoreContext(seed=seed, batch_size=cfg.select.batch_size, compute=cfg.compute)
    if whole:
        f, g = embed_patches(model, img[None], ctx)
        return [(0, 0, img.shape[0], img.shape[1])], f, g
    grid = candidate_grid(images, i, cfg)
    feats, shares = [], []
    for start in range(0, len(grid), _CHUNK):
        part = grid[start : start + _CHUNK]
        f, g = embed_patches(model, np.stack([img[y : y + ph, x : x + pw] for y, x, ph, pw in part]), ctx)
        feats.append(f)
        shares.append(g)
    if not feats:
        return [], np.zeros((0, 0)), np.zeros(0)
    return grid, np.concatenate(feats), np.concatenate(shares)


def _set_level_candidates(model: SegmentationModel, images: ImageSet, pool: np.ndarray, budget: int, unit: str,
                          method: str, cfg: Config, seed: int, whole: bool, bar: Progress) -> list[Item]:
    """Every candidate of a set-level method, scored by its place in the order
    :func:`fsmeta.select.diversity.typiclust_order` or :func:`~fsmeta.select.diversity.coverage_order`
    gives (n for the first, 1 for the last)."""
    from fsmeta.select.diversity import coverage_order, typiclust_order

    windows: list[Item] = []
    feats, shares, owners = [], [], []  # per patch (coverage; unit=patch), or per image (typiclust, unit=image: features only)
    image_shares = []  # unit=image: θ′'s predicted foreground share of each image (the mean over its patches)
    for i in pool:
        grid, f, g = embed_image(model, images, int(i), cfg, seed, whole=whole)
        bar.update()
        if not grid:
            continue
        if unit == "patch":
            owners.append(np.arange(len(windows), len(windows) + len(grid)))
            windows += [Item(int(i), y, x, ph, pw, 0.0) for y, x, ph, pw in grid]
            feats.append(f)
            shares.append(g)
        else:
            img_h, img_w = images.images[int(i)].shape[:2]
            image_shares.append(float(g.mean()))
            if method == "coverage":
                owners.append(np.full(len(grid), len(windows)))
                feats.append(f)
                shares.append(g)
            else:
                mean = f.mean(0)
                feats.append((mean / max(float(np.linalg.norm(mean)), 1e-12))[None])
            windows.append(Item(int(i), 0, 0, img_h, img_w, 0.0))
    if budget > len(windows):
        return windows  # the caller names the shortfall
    min_fg = cfg.select.min_predicted_foreground
    candidate_share = np.concatenate(shares) if unit == "patch" else np.array(image_shares)
    if method == "coverage":  # eligible first whatever the budget, so the order is one for every budget
        order = coverage_order(np.concatenate(feats), np.concatenate(owners), np.concatenate(shares), len(windows), seed,
                               min_fg, candidate_share >= min_fg)
    else:
        order = typiclust_order(np.concatenate(feats), candidate_share, budget, seed, min_fg)
    n = len(windows)
    return [dataclasses.replace(windows[k], score=float(n - pos)) for pos, k in enumerate(order)]


def mean_of_uniforms_cdf(mean: float, n: int) -> float:
    """P(the mean of n independent U(0, 1) draws ≤ ``mean``): the Irwin–Hall CDF at n·mean, exact up to
    n = 20, beyond that the normal approximation (variance 1/(12n)). Maps a per-image mean of ``random``
    patch scores to a U(0, 1) draw whatever the image's patch count."""
    x = min(max(n * mean, 0.0), float(n))
    if n <= 20:
        total = sum((-1) ** k * math.comb(n, k) * (x - k) ** n for k in range(int(math.floor(x)) + 1))
        return min(max(total / math.factorial(n), 0.0), 1.0)
    return 0.5 * math.erfc(-(mean - 0.5) * math.sqrt(6.0 * n))


def score_image(model: SegmentationModel, images: ImageSet, i: int, method: str, cfg: Config, seed: int,
                whole: bool = False) -> list[Item]:
    """Score the grid windows of image ``i`` (or the whole image as one item)."""
    sel = cfg.select
    img = images.image(i)
    h, w = img.shape
    ctx = dict(seed=seed, psi=float(sel.lookup("psi", images.name)), passes=sel.mc_passes, dropout=sel.dropout,
               batch_size=sel.batch_size, hard_target=sel.consistency_target == "hard", weighted=sel.consistency_weighted,
               compute=cfg.compute)
    if whole:
        (s,) = score_patches(method, model, img[None], ScoreContext(key=int(i) * 1_000_003, **ctx))
        return [Item(int(i), 0, 0, h, w, float(s))]
    grid = candidate_grid(images, i, cfg)
    items = []
    for c, start in enumerate(range(0, len(grid), _CHUNK)):
        part = grid[start : start + _CHUNK]
        patches = np.stack([img[y : y + ph, x : x + pw] for y, x, ph, pw in part])
        scores = score_patches(method, model, patches, ScoreContext(key=int(i) * 1_000_003 + c, **ctx))
        items += [Item(int(i), y, x, ph, pw, float(s)) for (y, x, ph, pw), s in zip(part, scores)]
    return items


def check_budget(images: ImageSet, pool: Iterable[int], budget: int, unit: str, cfg: Config) -> None:
    """Refuse a budget larger than the pool's candidates before any training or scoring.

    Counts what :func:`score_image` would score: the images, or the windows of the
    patch grid (after ``select.candidate_min_foreground``, which reads true masks).
    """
    sel = cfg.select
    pool = [int(i) for i in pool]
    if budget < 1:
        raise FsmetaError(f"the selection budget must be at least 1, got {budget}")
    if unit == "image":
        if budget > len(pool):
            raise FsmetaError(f"a budget of {budget} image(s) is larger than the pool of {len(pool)} image(s) of {images.name}")
        return
    stride = sel.patch_stride or cfg.data.stride(images.name, "finetune")
    count = 0
    for i in pool:
        h, w = images.images[i].shape[:2]
        grid = patch_grid(h, w, sel.patch_size, stride)
        if sel.candidate_min_foreground > 0:
            mask = images.masks[i]
            grid = [g for g in grid if int(np.count_nonzero(mask[g[0] : g[0] + g[2], g[1] : g[1] + g[3]])) >= sel.candidate_min_foreground]
        count += len(grid)
    if budget > count:
        raise FsmetaError(f"a budget of {budget} patches is larger than the {count} candidate patches of the pool "
                          f"({len(pool)} image(s) of {images.name}, {sel.patch_size}×{sel.patch_size} patches at stride {stride})")


def rank(items: list[Item]) -> tuple[Item, ...]:
    """Highest score first; ties by (image, y, x)."""
    if not items:
        return ()
    keys = np.lexsort(([it.x for it in items], [it.y for it in items], [it.image for it in items], [-it.score for it in items]))
    return tuple(items[k] for k in keys)


def select_support(
    model_or_ckpt: SegmentationModel | str | Path,
    images: ImageSet,
    pool_indices: Iterable[int],
    budget: int,
    method: str,
    unit: str,
    cfg: Config,
    seed: int = 0,
    *,
    run_pretext: bool = True,
    gamma: float | str | None = None,
    exclude: Iterable[int] | None = None,
    progress: bool = False,
) -> Selection:
    """Rank the pool's candidates by ``method`` and select the top ``budget``.

    Args:
        model_or_ckpt: the pre-trained model (or its checkpoint path).
        images: the target data set; masks are never read here.
        pool_indices: the images that may be selected (2023 protocol: the non-test images).
        budget: patches (``unit="patch"``) or whole images (``unit="image"``).
        method: ``random``, ``entropy``, ``mc-dropout``, ``consistency`` (a score per candidate),
            ``typiclust`` or ``coverage`` (a set from θ′'s features, :mod:`fsmeta.select.diversity`).
        unit: ``patch`` or ``image``.
        cfg: ``select.*`` (patch grid, ψ, passes, pretext), ``data.crop_size``/strides.
        seed: random and MC-dropout draws, and the pretext's crop order.
        run_pretext: fine-tune a copy of the model on pseudo-labels first
            (:func:`fsmeta.select.pretext.pretext_finetune`). Pass False when the
            model is already the pretext model θ' (compute it once per target and
            reuse it across methods, budgets and splits); the caller's model is
            never modified.
        gamma: pretext pseudo-label γ override (number or ``"auto"``).
        exclude: image indices that must not be in the pool (e.g. the test split); checked.
        progress: a progress line every few seconds while images are scored (off in studies).

    Returns:
        a :class:`Selection` with every candidate ranked and ``budget`` selected.
    """
    if method not in SCORERS and method not in SET_METHODS:
        raise FsmetaError(f"unknown selection method {method!r}; choose one of {', '.join([*SCORERS, *SET_METHODS])}")
    if unit not in UNITS:
        raise FsmetaError(f"unknown selection unit {unit!r}; choose 'patch' or 'image'")
    pool = _check_pool(images, pool_indices, exclude)
    if budget < 1:
        raise FsmetaError(f"the selection budget must be at least 1, got {budget}")
    sel = cfg.select
    if unit == "image" and budget > len(pool):
        raise FsmetaError(f"a budget of {budget} image(s) is larger than the pool of {len(pool)} image(s) of {images.name}")
    model = _resolve_model(model_or_ckpt)
    if run_pretext and method != "random" and sel.pretext_epochs > 0:
        from fsmeta.select.pretext import pretext_finetune

        model = pretext_finetune(copy.deepcopy(model), images, cfg, seed,
                                 indices=None if sel.pretext_images == "all" else pool, gamma=gamma)
    whole = unit == "image" and sel.image_score == "whole"
    items: list[Item] = []
    per_image: list[Item] = []
    bar = Progress(len(pool), f"select: {method} scores", enabled=progress)
    if method in SET_METHODS:
        (items if unit == "patch" else per_image).extend(_set_level_candidates(model, images, pool, budget, unit, method, cfg, seed, whole, bar))
        pool = pool[:0]  # nothing left to score one by one
    counts: list[int] = []  # patches behind each per-image mean
    for i in pool:
        scored = score_image(model, images, int(i), method, cfg, seed, whole=whole)
        bar.update()
        if unit == "patch":
            items += scored
        elif scored:  # an image left without candidate patches (candidate_min_foreground) is not a candidate
            img_h, img_w = images.images[int(i)].shape[:2]
            per_image.append(Item(int(i), 0, 0, img_h, img_w, float(np.mean([it.score for it in scored]))))
            counts.append(len(scored))
    if method == "random" and unit == "image" and len(set(counts)) > 1:
        # The mean of n uniform draws spreads less the more patches an image has, so ranking raw means
        # would put the smallest images first: their CDF is uniform whatever n, a fair draw of images of
        # any size. (Equal counts, as on TNBC, EM and ssTEM: the means already rank uniformly; kept.)
        per_image = [dataclasses.replace(it, score=mean_of_uniforms_cdf(it.score, n)) for it, n in zip(per_image, counts)]
    candidates = items if unit == "patch" else per_image
    if unit == "image" and budget > len(candidates):
        raise FsmetaError(f"a budget of {budget} image(s) is larger than the {len(candidates)} image(s) of {images.name} "
                          f"with a patch of {sel.candidate_min_foreground} foreground pixels")
    if budget > len(candidates):
        raise FsmetaError(
            f"a budget of {budget} patches is larger than the {len(candidates)} candidate patches of the pool "
            f"({len(pool)} image(s) of {images.name}, {sel.patch_size}×{sel.patch_size} patches)"
        )
    return Selection(method, unit, int(budget), rank(candidates))


def selection_index(images: ImageSet, selection: Selection, cfg: Config, min_foreground: int | None = None) -> CropIndex:
    """The fine-tuning crops of an image-unit selection (see :func:`selection_crops`), as an index."""
    if selection.unit != "image":
        raise FsmetaError(f"selection_index: a {selection.unit!r}-unit selection has no crop grid; use selection_crops")
    # images smaller than the crop shrink it, as for `fsmeta finetune` on a user's folders
    grid = cfg.finetune_grid(images.name)
    if min_foreground is not None:
        grid["min_foreground"] = min_foreground
    index, _ = support_crop_index(images, **grid, subset=selection.image_indices())
    return index


def selection_crops(
    images: ImageSet, selection: Selection, cfg: Config, min_foreground: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-tuning crops of a selection, labelled with the TRUE masks (the annotation).

    ``unit="image"``: every fine-tuning crop (``finetune.crop_size``) of the selected images at the
    data set's fine-tune stride, keeping crops with at least ``min_foreground``
    foreground pixels (None: ``data.min_foreground`` scaled to the crop, ``Config.finetune_min_foreground``), exactly as a K-shot
    support set (§4.5). ``unit="patch"``: the selected patches themselves
    (None: all of them, 0 foreground pixels allowed — each cost the annotator).

    Returns:
        x (N, 1, S, S) float32 in [-1, 1] and y (N, 1, S, S) float32 in {0, 1}.
    """
    if selection.unit == "image":
        x, y = gather(images, selection_index(images, selection, cfg, min_foreground))
        return torch.from_numpy(x), torch.from_numpy(y)
    keep = [it for it in selection.selected
            if int(np.count_nonzero(images.masks[it.image][it.y : it.y + it.height, it.x : it.x + it.width])) >= (min_foreground or 0)]
    if not keep:
        raise FsmetaError(f"none of the {selection.budget} selected patches of {images.name} has {min_foreground} foreground pixels")
    shapes = {(it.height, it.width) for it in keep}
    if len(shapes) > 1:
        raise FsmetaError(f"selected patches of {images.name} differ in size {sorted(shapes)}; images smaller than select.patch_size?")
    xs = np.stack([to_unit_float(images.images[it.image][it.y : it.y + it.height, it.x : it.x + it.width]) for it in keep])[:, None]
    ys = np.stack([images.masks[it.image][it.y : it.y + it.height, it.x : it.x + it.width] for it in keep])[:, None]
    return torch.from_numpy(normalise(xs.astype(np.float32))), torch.from_numpy(ys.astype(np.float32))
