"""Support-set selection on cases with known answers: pseudo-labels, PIL augmentations,
each scorer, budgets, and the 2023 split's test images never selected."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
import torch.nn.functional as F
from torch import nn

from fsmeta.config import ConfigError, SelectConfig, load_config
from fsmeta.data.sampling import protocol_split
from fsmeta.data.store import ImageSet
from fsmeta.errors import FsmetaError
from fsmeta.finetune import finetune
from fsmeta.models import SegmentationModel, build_model
from fsmeta.select import (
    ScoreContext,
    augment,
    auto_gamma,
    dilate_2x2,
    kmeans_foreground,
    patch_budget,
    patch_grid,
    pretext_finetune,
    pseudo_label,
    pseudo_labelled,
    score_patches,
    select_support,
    selection_crops,
)
from fsmeta.select.scorers import to_uint8


def disc_image(size: int = 48, radius: int = 9, inside: float = 0.2, outside: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= radius**2
    return np.where(disc, inside, outside).astype(np.float32), disc


def dilate_reference(m: np.ndarray) -> np.ndarray:
    """out[r, c] = any(m[r-1..r, c-1..c]): the 2×2 square anchored at its lower-right cell."""
    h, w = m.shape
    out = np.zeros_like(m, dtype=bool)
    for r in range(h):
        for c in range(w):
            out[r, c] = m[max(r - 1, 0) : r + 1, max(c - 1, 0) : c + 1].any()
    return out


# ---------------------------------------------------------------- pseudo-labels


def test_dark_disc_is_found_and_dilated_by_exactly_2x2():
    img, disc = disc_image()
    bare = pseudo_label(img, 0.5, dilate=False)
    np.testing.assert_array_equal(bare, disc.astype(np.uint8))
    full = pseudo_label(img, 0.5)
    np.testing.assert_array_equal(full, dilate_reference(disc).astype(np.uint8))
    # A disc spanning 19 rows and 19 columns gains, by the shift down and right, at least a row and a column.
    assert full.sum() >= disc.sum() + 19
    lone = np.zeros((5, 5), bool)
    lone[2, 2] = True
    grown = dilate_2x2(lone)
    assert grown.sum() == 4 and grown[2:4, 2:4].all()


def test_gamma_below_the_disc_fraction_finds_nothing_and_auto_finds_the_disc():
    img, disc = disc_image()
    fraction = disc.mean()  # the equalised value of every disc pixel
    assert pseudo_label(img, fraction * 0.9, dilate=False).sum() == 0
    assert auto_gamma(img) == pytest.approx(fraction)
    np.testing.assert_array_equal(pseudo_label(img, "auto", dilate=False), disc.astype(np.uint8))


def test_bright_objects_need_bright_polarity():
    img, disc = disc_image(inside=0.9, outside=0.1)  # fluorescence: bright cell on dark
    np.testing.assert_array_equal(pseudo_label(img, 0.5, polarity="bright", dilate=False), disc.astype(np.uint8))
    # The paper's inverse threshold on a fluorescent image labels the background instead.
    np.testing.assert_array_equal(pseudo_label(img, 0.99, polarity="dark", dilate=False), (~disc).astype(np.uint8))


def test_skewness_by_hand_and_the_polarity_it_chooses():
    from fsmeta.select.pseudo import choose_polarity, skewness

    # [0, 0, 0, 3]: mean 0.75, sd √1.6875; z = −1/√3 (×3) and √3; mean z³ = (3·(−1/√3)³ + √3³)/4 = 2/√3
    assert skewness(np.array([[0.0, 0.0], [0.0, 3.0]])) == pytest.approx(2 / np.sqrt(3))
    assert skewness(np.full((4, 4), 0.3)) is None
    bright = [disc_image(inside=0.9, outside=0.1, radius=r)[0] for r in (6, 8, 9)]  # discs cover 5–11 % of the image
    polarity, reason = choose_polarity(bright, "mylab")
    assert polarity == "bright" and "median intensity skewness +" in reason and "3 sampled" in reason
    assert choose_polarity([1 - b for b in bright], "mylab")[0] == "dark"  # the same images as dark objects on light
    # the median decides: one bright-tailed image among three dark-tailed ones does not flip it
    assert choose_polarity([bright[0], *(1 - b for b in bright)], "mylab")[0] == "dark"
    assert choose_polarity([np.full((8, 8), 0.5)], "mylab") == ("dark", "mylab: no image with contrast to read a polarity from; dark, the default")


def test_a_labs_data_set_without_an_entry_gets_the_polarity_of_its_images(tiny_config):
    from fsmeta.select.pretext import resolve_polarity

    bright = [disc_image(inside=0.9, outside=0.1, radius=r)[0] for r in (6, 8, 9)]
    def image_set(name, kind, images):
        n = len(images)
        return ImageSet(name, [f"i{k}" for k in range(n)], images, [np.zeros(im.shape, np.uint8) for im in images],
                        ["train"] * n, [""] * n, {"kind": kind})

    cfg = tiny_config()
    assert resolve_polarity(cfg, image_set("mylab", "imported", bright))[0] == "bright"
    assert resolve_polarity(cfg, image_set("pool", "folder", [1 - b for b in bright]))[0] == "dark"
    # a prepared or synthetic data set without an entry keeps the table's default, whatever its images show
    assert resolve_polarity(cfg, image_set("tnbc", "public", bright)) == ("dark", "select.polarity default")
    # an entry for the name wins: built in (b5) or configured
    assert resolve_polarity(cfg, image_set("b5", "imported", [1 - b for b in bright]))[0] == "bright"
    pinned = tiny_config("select.polarity={mylab: dark}")
    assert resolve_polarity(pinned, image_set("mylab", "imported", bright)) == ("dark", "select.polarity entry for mylab")
    # the pseudo-labels follow it: the discs, not the background, are foreground
    labelled = pseudo_labelled(image_set("mylab", "imported", bright), cfg, gamma=0.2)
    assert labelled.meta["polarity"] == "bright"
    for im, m in zip(bright, labelled.masks):
        assert m[24, 24] == 1 and m[0, 0] == 0


def test_kmeans_takes_the_darker_cluster():
    rng = np.random.default_rng(0)
    img, disc = disc_image()
    noisy = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1).astype(np.float32)
    np.testing.assert_array_equal(kmeans_foreground(noisy), disc)
    np.testing.assert_array_equal(pseudo_label(noisy, method="kmeans", dilate=False), disc.astype(np.uint8))


def test_degenerate_inputs_give_clear_answers():
    flat = np.full((16, 16), 0.4, np.float32)
    assert pseudo_label(flat, 0.5).sum() == 0 and pseudo_label(flat, "auto").sum() == 0
    with pytest.raises(FsmetaError, match="must lie in"):
        pseudo_label(flat, 1.5)
    with pytest.raises(FsmetaError, match="'auto'"):
        pseudo_label(flat, "otsu")


# ---------------------------------------------------------------- augmentations


@pytest.mark.parametrize("name", ["autocontrast", "brightness", "sharpness"])
def test_augmentations_equal_pil(name):
    rng = np.random.default_rng(1)
    patch = rng.integers(30, 200, (40, 40), dtype=np.uint8)
    pil = Image.fromarray(patch)
    expected = {
        "autocontrast": ImageOps.autocontrast(pil),
        "brightness": ImageEnhance.Brightness(pil).enhance(1.3),
        "sharpness": ImageEnhance.Sharpness(pil).enhance(1.3),
    }[name]
    np.testing.assert_array_equal(augment(patch, name, 1.3), np.asarray(expected))
    # The float path the scorer takes is lossless for 8-bit data.
    np.testing.assert_array_equal(to_uint8(patch.astype(np.float32) / 255.0), patch)


# ---------------------------------------------------------------- scorers


class Pixelwise(SegmentationModel):
    """logit = gain × (mean of 8 channels of the normalised input): certain where the image is
    near black or white, uncertain at mid-grey. Dropout2d sits before the last conv."""

    def __init__(self, gain: float = 20.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 1, bias=False)
        self.dropout = nn.Dropout2d(0.0)
        self.head = nn.Conv2d(8, 1, 1, bias=False)
        with torch.no_grad():
            self.stem.weight.fill_(1.0)
            self.head.weight.fill_(gain / 8)

    def _forward(self, x):
        return self.head(self.dropout(self.stem(x))), x


def two_images(certain: int = 250, unsure: int = 128, size: int = 32) -> ImageSet:
    imgs = [np.full((size, size), certain, np.uint8), np.full((size, size), unsure, np.uint8)]
    return ImageSet("hand", ["certain", "unsure"], imgs, [np.zeros((size, size), np.uint8)] * 2, ["train"] * 2, ["", ""])


@pytest.fixture
def cfg(tiny_config):
    return tiny_config("select.patch_size=16", "select.patch_stride=16", "select.pretext_epochs=1", "select.mc_passes=4")


@pytest.mark.parametrize("method", ["entropy", "mc-dropout", "consistency"])
def test_certain_image_ranks_below_uncertain(cfg, method):
    images = two_images()
    for unit, budget in (("image", 1), ("patch", 4)):
        sel = select_support(Pixelwise(), images, [0, 1], budget, method, unit, cfg, seed=0, run_pretext=False)
        assert [it.image for it in sel.selected] == [1] * budget, (unit, sel.ranking)
        scores = {it.image: it.score for it in sel.ranking}
        assert scores[1] > scores[0]
    cfg.select.image_score = "whole"  # one full-resolution score per image instead of the mean of its patches
    sel = select_support(Pixelwise(), images, [0, 1], 1, method, "image", cfg, seed=0, run_pretext=False)
    assert [it.image for it in sel.selected] == [1] and len(sel.ranking) == 2


def test_consistency_is_zero_for_a_prediction_augmentations_cannot_move():
    # White saturates: auto-contrast, brightness and sharpness leave it white, and the model is sure.
    scores = score_patches("consistency", Pixelwise(), np.ones((2, 16, 16), np.float32), ScoreContext(psi=1.3))
    assert np.all(scores < 1e-6)


def test_consistency_weight_is_the_weighted_bce_of_section_4_2():
    from fsmeta.losses import weighted_bce
    from fsmeta.select.scorers import _foreground_weight

    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8)
    target = (torch.rand(3, 1, 8, 8) > 0.7).float()
    target[1] = 0.0  # no foreground: w = 1, as §4.2
    mine = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * _foreground_weight(target)).flatten(1).mean(1)
    for i in range(3):
        torch.testing.assert_close(mine[i], weighted_bce(logits[i : i + 1], target[i : i + 1]))
    # All foreground: w = 1 too (§4.2 would give 0, silencing the patch).
    assert torch.equal(_foreground_weight(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))


def test_mc_dropout_is_stochastic_but_seeded():
    torch.manual_seed(0)
    model = build_model("fcrn").eval()
    probe = torch.zeros(1, 1, 32, 32)
    with torch.no_grad():
        reference = model(probe)
    patches = np.random.default_rng(2).random((3, 32, 32)).astype(np.float32)
    one_pass = lambda seed: score_patches("mc-dropout", model, patches, ScoreContext(seed=seed, passes=1, dropout=0.5))  # noqa: E731
    np.testing.assert_array_equal(one_pass(0), one_pass(0))
    assert not np.allclose(one_pass(0), one_pass(1))  # different dropout masks, different predictions
    ten = score_patches("mc-dropout", model, patches, ScoreContext(seed=0, passes=10, dropout=0.5))
    np.testing.assert_array_equal(ten, score_patches("mc-dropout", model, patches, ScoreContext(seed=0, passes=10, dropout=0.5)))
    # Dropout is off again afterwards: the model computes exactly what it did before.
    assert model.dropout.p == 0.0 and not model.dropout.training
    with torch.no_grad():
        torch.testing.assert_close(model(probe), reference, rtol=0, atol=0)


def test_random_scores_are_seeded_per_image():
    a = score_patches("random", None, np.zeros((4, 8, 8), np.float32), ScoreContext(seed=3, key=7))
    b = score_patches("random", None, np.zeros((4, 8, 8), np.float32), ScoreContext(seed=3, key=7))
    c = score_patches("random", None, np.zeros((4, 8, 8), np.float32), ScoreContext(seed=4, key=7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_random_image_draw_does_not_favour_images_with_fewer_patches(cfg):
    from fsmeta.select.selection import mean_of_uniforms_cdf, score_image

    # Irwin–Hall by hand: n = 1 is the identity; n = 2 at mean 0.25 (x = 0.5) is x²/2 = 0.125; symmetric about 0.5
    assert mean_of_uniforms_cdf(0.3, 1) == pytest.approx(0.3)
    assert mean_of_uniforms_cdf(0.25, 2) == pytest.approx(0.125)
    assert mean_of_uniforms_cdf(0.5, 7) == pytest.approx(0.5) and mean_of_uniforms_cdf(0.5, 64) == pytest.approx(0.5)
    assert mean_of_uniforms_cdf(0.55, 20) == pytest.approx(1 - mean_of_uniforms_cdf(0.45, 20))
    rng = np.random.default_rng(0)
    small = [rng.random((16, 16)).astype(np.float32) for _ in range(10)]  # one 16² patch each
    large = [rng.random((64, 64)).astype(np.float32) for _ in range(10)]  # sixteen each
    mixed = ImageSet("mixed", [f"i{k}" for k in range(20)], small + large, [np.zeros(a.shape, np.uint8) for a in small + large],
                     ["train"] * 20, [""] * 20)
    picks = [select_support(Pixelwise(), mixed, range(20), 1, "random", "image", cfg, seed=s, run_pretext=False).selected[0].image
             for s in range(200)]
    # ranking raw means, a one-patch image (spread ±0.5) beat the sixteen-patch ones (±0.07) nearly every time
    assert 0.4 < np.mean([p < 10 for p in picks]) < 0.6
    # images of one size rank by their raw means, as before (TNBC, EM and ssTEM draws unchanged)
    same = ImageSet("same", [f"i{k}" for k in range(10)], large, [np.zeros(a.shape, np.uint8) for a in large], ["train"] * 10, [""] * 10)
    sel = select_support(Pixelwise(), same, range(10), 3, "random", "image", cfg, seed=4, run_pretext=False)
    means = {i: np.mean([it.score for it in score_image(Pixelwise(), same, i, "random", cfg, 4)]) for i in range(10)}
    assert [it.image for it in sel.ranking] == sorted(means, key=lambda i: -means[i])
    assert [it.score for it in sel.ranking] == [means[it.image] for it in sel.ranking]


def test_unknown_method_and_unit(cfg):
    images = two_images()
    with pytest.raises(FsmetaError, match="unknown selection method 'coreset'"):
        select_support(Pixelwise(), images, [0, 1], 1, "coreset", "image", cfg)
    with pytest.raises(FsmetaError, match="unknown selection unit 'slice'"):
        select_support(Pixelwise(), images, [0, 1], 1, "entropy", "slice", cfg)


# ---------------------------------------------------------------- budgets, pools, crops


def test_patch_grid_and_paper_budgets(cfg):
    assert patch_grid(96, 96, 64, 32) == [(0, 0, 64, 64), (0, 32, 64, 64), (32, 0, 64, 64), (32, 32, 64, 64)]
    assert patch_grid(40, 100, 64, 64) == [(0, 0, 40, 64)]  # an image smaller than a patch on one side
    assert patch_budget("tnbc", 3, cfg) == 300 and patch_budget("em", 1, cfg) == 400
    assert patch_budget("sstem", 10, cfg) == 5000 and patch_budget("my-cells", 2, cfg) == 200


def test_budgets_in_patches_and_in_images(tiny_config):
    from fsmeta.data.registry import load_dataset

    cfg = tiny_config("select.patch_size=64", "select.patch_stride=32")  # 96×96 images: 4 patches each
    images = load_dataset("synth-he", cfg)
    pool, _ = protocol_split(len(images), "2023")
    by_patch = select_support(build_model("fcrn"), images, pool, 7, "random", "patch", cfg, seed=0)
    assert len(by_patch.ranking) == 4 * len(pool) and len(by_patch.selected) == 7
    assert all((it.height, it.width) == (64, 64) for it in by_patch.selected)
    x, y = selection_crops(images, by_patch, cfg)
    assert x.shape == y.shape == (7, 1, 64, 64) and x.min() >= -1 and set(np.unique(y.numpy())) <= {0.0, 1.0}
    first = by_patch.selected[0]
    np.testing.assert_array_equal(y[0, 0].numpy(), images.masks[first.image][first.y : first.y + 64, first.x : first.x + 64])
    by_image = select_support(build_model("fcrn"), images, pool, 2, "random", "image", cfg, seed=0)
    assert len(by_image.ranking) == len(pool) and len(by_image.image_indices()) == 2
    assert all((it.height, it.width) == (96, 96) for it in by_image.selected)
    assert by_image.annotated_pixels() == 2 * 96 * 96
    x, y = selection_crops(images, by_image, cfg, min_foreground=0)
    assert x.shape[0] == 2 * 4  # every 64×64 crop at the fine-tune stride 32 of the two images
    _, history = finetune(build_model("fcrn"), x, y, cfg.finetune, seed=0)  # what the benchmark does next
    assert len(history) == cfg.finetune.epochs and np.isfinite(history).all()


def test_budget_larger_than_the_pool_is_a_clear_error(tiny_config):
    from fsmeta.data.registry import load_dataset

    cfg = tiny_config("select.patch_size=64", "select.patch_stride=32")
    images = load_dataset("synth-he", cfg)
    pool, test = protocol_split(len(images), "2023")
    with pytest.raises(FsmetaError, match=r"budget of 7 image\(s\) is larger than the pool of 6 image\(s\) of synth-he"):
        select_support(build_model("fcrn"), images, pool, 7, "random", "image", cfg)
    with pytest.raises(FsmetaError, match="budget of 25 patches is larger than the 24 candidate patches"):
        select_support(build_model("fcrn"), images, pool, 25, "random", "patch", cfg)
    with pytest.raises(FsmetaError, match="at least 1"):
        select_support(build_model("fcrn"), images, pool, 0, "random", "patch", cfg)
    with pytest.raises(FsmetaError, match="contains test image"):
        select_support(build_model("fcrn"), images, range(len(images)), 1, "random", "patch", cfg, exclude=test)
    with pytest.raises(FsmetaError, match="pool of synth-he is empty"):
        select_support(build_model("fcrn"), images, [], 1, "random", "patch", cfg)


@pytest.mark.parametrize("method", ["random", "entropy", "mc-dropout", "consistency", "typiclust", "coverage"])
def test_selection_never_returns_a_test_image(tiny_config, method):
    from fsmeta.data.registry import load_dataset

    cfg = tiny_config("select.patch_size=64", "select.patch_stride=32", "select.pretext_epochs=1", "select.mc_passes=2",
                      "select.pretext_images=pool")
    images = load_dataset("synth-he", cfg)
    pool, test = protocol_split(len(images), "2023", 0.2, split_seed=3)
    torch.manual_seed(0)
    sel = select_support(build_model("fcrn"), images, pool, 4 * len(pool), method, "patch", cfg, seed=1,
                         run_pretext=method == "consistency", exclude=test)
    chosen = {it.image for it in sel.ranking}
    assert chosen == set(pool.tolist()) and not chosen & set(test.tolist())


@pytest.mark.parametrize("method", ["random", "entropy", "mc-dropout", "consistency", "typiclust", "coverage"])
def test_selection_never_reads_a_mask(tiny_config, method):
    """The pool's masks replaced by noise: the same ranking (pretext included, which sees pixels only)."""
    from fsmeta.data.registry import load_dataset

    cfg = tiny_config("select.patch_size=64", "select.patch_stride=32", "select.pretext_epochs=1", "select.mc_passes=2")
    images = load_dataset("synth-he", cfg)
    rng = np.random.default_rng(0)
    noisy = ImageSet(images.name, images.ids, images.images, [(rng.random(m.shape) > 0.5).astype(np.uint8) for m in images.masks],
                     images.splits, images.sources)
    pool, test = protocol_split(len(images), "2023", 0.2, split_seed=3)
    for unit, budget in (("patch", 5), ("image", 2)):
        runs = []
        for imgs in (images, noisy):
            torch.manual_seed(0)
            runs.append(select_support(build_model("fcrn"), imgs, pool, budget, method, unit, cfg, seed=1, exclude=test).ranking)
        assert runs[0] == runs[1], (method, unit)


def test_typiclust_picks_typical_members_of_distinct_clusters(tiny_config):
    from fsmeta.select.diversity import kmeans, typicality, typiclust_order

    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    blobs = np.concatenate([c + rng.normal(0, 0.3, (n, 3)) for c, n in zip(centres, (30, 20, 10))])
    truth = np.repeat([0, 1, 2], (30, 20, 10))
    labels = kmeans(blobs, 3, seed=0)
    assert len({(a, b) for a, b in zip(labels, truth)}) == 3  # the blobs, whatever the label names
    np.testing.assert_array_equal(kmeans(blobs, 3, seed=0), labels)  # seeded
    outlier = np.concatenate([blobs[:30], [[9.0, 0, 0]]])
    assert np.argmin(typicality(outlier)) == 30  # the lone point is the least typical
    fg = np.full(60, 0.1)
    order = typiclust_order(blobs, fg, 3, seed=0, min_foreground=0.01)
    assert sorted(truth[order[:3]].tolist()) == [0, 1, 2]  # one per cluster
    assert truth[order[0]] == 0  # the largest cluster first
    for j, k in enumerate(order[:3]):  # each the most typical member of its cluster
        members = np.nonzero(truth == truth[k])[0]
        assert k == members[np.argmax(typicality(blobs[members]))]
    assert sorted(order.tolist()) == list(range(60))
    fg[truth == 0] = 0.0  # θ′ sees no cells in the largest blob: its members are not chosen while others can be
    order = typiclust_order(blobs, fg, 3, seed=0, min_foreground=0.01)
    assert not set(truth[order[:3]].tolist()) & {0} and set(truth[order[-30:]].tolist()) == {0}
    fg[:] = 0.0  # nothing eligible: every candidate competes
    assert sorted(truth[typiclust_order(blobs, fg, 3, seed=0, min_foreground=0.01)[:3]].tolist()) == [0, 1, 2]


def _unit(deg):
    return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]


def test_coverage_takes_the_greedy_facility_location_order_by_hand():
    from fsmeta.select.diversity import coverage_order

    # patches: two of cells at 0° and one at 90° (the reference: predicted share ≥ 0.01); the
    # 0° and 45° ones θ′ sees as empty are candidates but represent nothing
    feats = np.array([_unit(0), _unit(0), _unit(0), _unit(90), _unit(45)])
    owners = np.array([0, 0, 1, 2, 3])
    share = np.array([0.1, 0.1, 0.0, 0.1, 0.0])
    # best(c, ·) over the references (0°, 0°, 90°): c0 = c1 = (1, 1, 0), c2 = (0, 0, 1),
    # c3 = (.707, .707, .707). Greedy: c3 (2.12 > 2), then c0 (2 × .293 = .586 > .293), then c2
    # (.293 > 0), then c1 — the duplicate of c0 last.
    assert coverage_order(feats, owners, share, 4, seed=0, min_foreground=0.01).tolist() == [3, 0, 2, 1]
    # the eligible first: among c0–c2, c0 (2; c1 ties at 2 and loses on its index), c2 (1), c1 (0); then c3
    eligible = np.array([True, True, True, False])
    assert coverage_order(feats, owners, share, 4, 0, 0.01, eligible).tolist() == [0, 2, 1, 3]
    # no reference qualifies: every patch is one
    order = coverage_order(feats, owners, np.zeros(5), 4, 0, 0.01)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="every one of the 5 candidates"):
        coverage_order(feats, owners, share, 5, 0, 0.01)


@pytest.mark.parametrize("memory, chunk", [(None, None), (0, 3)])
def test_coverage_lazy_greedy_equals_recomputing_every_gain(monkeypatch, memory, chunk):
    """Also with no room for the similarity table (every row recomputed when needed, in blocks
    of 3 patches): the same order."""
    from fsmeta.select import diversity
    from fsmeta.select.diversity import coverage_order

    if memory is not None:
        monkeypatch.setattr(diversity, "COVERAGE_MEMORY", memory)
        monkeypatch.setattr(diversity, "COVERAGE_CHUNK", chunk)

    rng = np.random.default_rng(4)
    feats = rng.normal(size=(300, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    owners = rng.integers(0, 40, 300)
    owners[:40] = np.arange(40)  # every candidate owns a patch
    share = rng.random(300) * 0.02
    ref = np.nonzero(share >= 0.01)[0]
    best = np.zeros((40, len(ref)))
    np.maximum.at(best, owners, np.maximum(feats @ feats[ref].T, 0))
    covered, left, naive = np.zeros(len(ref)), list(range(40)), []
    while left:
        gains = [np.maximum(best[c] - covered, 0).sum() for c in left]
        pick = left.pop(int(np.argmax(gains)))
        naive.append(pick)
        covered = np.maximum(covered, best[pick])
    assert coverage_order(feats, owners, share, 40, seed=0, min_foreground=0.01).tolist() == naive


def test_coverage_ranking_serves_every_budget(tiny_config, tmp_path):
    """Coverage's picks are nested: the ranking for one budget is the ranking for another, so a
    study keeps one per split (unlike typiclust's, whose k-means has k = the budget)."""
    from fsmeta.data.registry import load_dataset
    from fsmeta.study import Cell, _ranking_file

    cfg = tiny_config("select.patch_size=64", "select.patch_stride=32", "select.pretext_epochs=0")
    images = load_dataset("synth-he", cfg)
    pool, test = protocol_split(len(images), "2023", 0.2, split_seed=3)
    rankings = []
    for unit, budgets in (("image", (1, 3)), ("patch", (2, 7))):
        for b in budgets:
            torch.manual_seed(0)
            rankings.append(select_support(build_model("fcrn"), images, pool, b, "coverage", unit, cfg, seed=1, exclude=test).ranking)
    assert rankings[0] == rankings[1] and rankings[2] == rankings[3]
    assert sorted(it.image for it in rankings[0]) == sorted(pool.tolist())
    checkpoint = tmp_path / "pretext.safetensors"
    checkpoint.write_bytes(b"weights")
    path = {(m, k): _ranking_file(cfg, checkpoint, Cell("synth-he", "fcrn", "meta-all", m, k, 0))
            for m in ("coverage", "typiclust") for k in (1, 3)}
    assert path["coverage", 1] == path["coverage", 3] and path["typiclust", 1] != path["typiclust", 3]


def test_candidate_filter_on_true_masks_is_opt_in(tiny_config):
    from fsmeta.data.registry import load_dataset

    cfg = tiny_config("select.patch_size=64", "select.patch_stride=32")
    images = load_dataset("synth-he", cfg)
    pool, _ = protocol_split(len(images), "2023")
    fg = lambda it: int(images.masks[it.image][it.y : it.y + 64, it.x : it.x + 64].sum())  # noqa: E731
    everything = select_support(build_model("fcrn"), images, pool, 1, "random", "patch", cfg)
    threshold = sorted(fg(it) for it in everything.ranking)[len(everything.ranking) // 2]  # drops about half
    cfg.select.candidate_min_foreground = threshold
    filtered = select_support(build_model("fcrn"), images, pool, 1, "random", "patch", cfg)
    assert 0 < len(filtered.ranking) < len(everything.ranking)
    assert all(fg(it) >= threshold for it in filtered.ranking)


# ---------------------------------------------------------------- pretext


def test_pretext_uses_pixels_only_and_is_reproducible(tiny_config):
    from fsmeta.data.registry import load_dataset

    cfg = tiny_config("select.pretext_epochs=2", "select.pretext_batch_size=4", "select.pretext_images=pool")
    images = load_dataset("synth-he", cfg)
    blind = ImageSet(images.name, images.ids, images.images, [np.ones_like(m) for m in images.masks],
                     images.splits, images.sources)
    for a, b in zip(pseudo_labelled(images, cfg).masks, pseudo_labelled(blind, cfg).masks):
        np.testing.assert_array_equal(a, b)
    torch.manual_seed(0)
    base = build_model("fcrn")
    one = pretext_finetune(copy.deepcopy(base), images, cfg, seed=5, indices=[0, 1])  # 8 crops, 2 epochs
    two = pretext_finetune(copy.deepcopy(base), images, cfg, seed=5, indices=[0, 1])
    for (k, v1), v2 in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(v1, v2, rtol=0, atol=0, msg=k)
    assert not torch.equal(one.head.weight, base.head.weight)
    # select_support pretexts a copy: the caller's model is untouched.
    before = {k: v.clone() for k, v in base.state_dict().items()}
    select_support(base, images, [0, 1], 1, "entropy", "image", cfg)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_pretext_max_steps_cuts_the_epochs_short(tiny_config):
    from fsmeta.data.registry import load_dataset

    images = load_dataset("synth-he", tiny_config())
    torch.manual_seed(0)
    base = build_model("fcrn")

    def run(*overrides):
        cfg = tiny_config("select.pretext_epochs=2", "select.pretext_batch_size=4", *overrides)
        model = copy.deepcopy(base)
        seen = []
        original = model.forward_with_latent
        model.forward_with_latent = lambda t: (seen.append(len(t)), original(t))[1]
        pretext_finetune(model, images, cfg, seed=5, indices=[0, 1])  # 8 crops: 2 steps per epoch
        return model, seen

    capped, seen = run("select.pretext_max_steps=3")
    assert seen == [4, 4, 4]  # epoch 0 whole, epoch 1 cut after its first batch
    full, seen_full = run()
    assert seen_full == [4, 4, 4, 4]
    loose, _ = run("select.pretext_max_steps=4")  # a cap at or above the epochs' steps changes nothing
    for k, v in full.state_dict().items():
        assert torch.equal(v, loose.state_dict()[k]), k
    assert not torch.equal(capped.head.weight, full.head.weight)


def test_pretext_grid_reaches_the_far_edges_with_cover_edges(tiny_config):
    # 100-px images, 64-px crops at stride 64: the grid alone takes one window an image and leaves a
    # 36-px strip on two sides; finetune.cover_edges adds the windows flush with the far edges (4 an image)
    rng = np.random.default_rng(0)
    images = ImageSet("lab", ["a", "b"], [rng.random((100, 100), dtype=np.float32) for _ in range(2)],
                      [np.zeros((100, 100), np.uint8)] * 2, ["train"] * 2, ["x"] * 2, meta={"kind": "imported"})
    torch.manual_seed(0)
    base = build_model("fcrn")

    def batches(cover):
        cfg = tiny_config("select.pretext_epochs=1", "select.pretext_batch_size=64", "select.pretext_stride=64",
                          f"finetune.cover_edges={cover}")
        model, seen = copy.deepcopy(base), []
        original = model.forward_with_latent
        model.forward_with_latent = lambda t: (seen.append(tuple(t.shape)), original(t))[1]
        pretext_finetune(model, images, cfg, seed=0)
        return seen

    assert batches("false") == [(2, 1, 64, 64)]
    assert batches("true") == [(8, 1, 64, 64)]


# ---------------------------------------------------------------- configuration


def test_select_config_tables_and_validation():
    sel = load_config(None, ["select.gamma={em: 0.3}", "select.polarity={mine: bright}"]).select
    assert sel.lookup("gamma", "em") == 0.3 and sel.lookup("gamma", "tnbc") == 0.08  # other defaults kept
    assert sel.lookup("polarity", "mine") == "bright" and sel.lookup("polarity", "b39") == "bright"
    assert sel.lookup("psi", "b5") == 1.6 and sel.lookup("psi", "tnbc") == 1.3
    assert sel.lookup("gamma", "unknown") == SelectConfig().gamma["default"]
    with pytest.raises(ConfigError, match="select.unit='pixels'"):
        load_config(None, ["select.unit=pixels"])
    with pytest.raises(ConfigError, match="select.gamma"):
        load_config(None, ["select.gamma={em: 2.0}"])


def test_annotation_composition_counts_foreground_and_empty_windows():
    from fsmeta.study import annotation_composition

    m0 = np.zeros((8, 8), np.uint8)
    m0[0:2, 0:3] = 1  # 6 foreground pixels, all in the top-left 4×4
    m1 = np.ones((4, 4), np.uint8)
    images = ImageSet("t", ["a", "b"], [m0, m1], [m0, m1], ["train", "train"], ["x", "x"])
    # the top-left and bottom-right 4×4 patches of image a, and the whole of image b
    got = annotation_composition(images, [(0, 0, 0, 4, 4), (0, 4, 4, 4, 4), (1, 0, 0, 4, 4)])
    assert got == {"support_foreground": (6 + 0 + 16) / 48, "support_empty": 1 / 3}
    assert annotation_composition(images, []) == {"support_foreground": 0.0, "support_empty": 0.0}
