"""Tests of the procedural microscopy domains (fsmeta.data.synth)."""

from __future__ import annotations

import numpy as np
import pytest

from fsmeta.data import synth
from fsmeta.data.synth import DESCRIPTIONS, DOMAINS, generate, generate_pair

# Foreground fraction (mean over 8 images at 256²) each domain was designed for.
FG_RANGE = {
    "synth-fluo": (0.08, 0.25),
    "synth-nuclei": (0.08, 0.25),
    "synth-em": (0.03, 0.08),
    "synth-he": (0.08, 0.15),
    "synth-phase": (0.06, 0.18),
}


@pytest.fixture(scope="module")
def batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {d: generate(d, 8, 256, seed=0) for d in DOMAINS}


def test_domain_list_and_descriptions() -> None:
    assert DOMAINS == ("synth-fluo", "synth-nuclei", "synth-em", "synth-he", "synth-phase")
    assert set(DESCRIPTIONS) == set(DOMAINS)
    assert all(isinstance(v, str) and v and "\n" not in v for v in DESCRIPTIONS.values())


@pytest.mark.parametrize("domain", DOMAINS)
def test_deterministic_and_prefix_stable(domain: str) -> None:
    a_img, a_mask = generate(domain, 3, 64, seed=1)
    b_img, b_mask = generate(domain, 3, 64, seed=1)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    for i in range(3):
        img, mask = generate(domain, i + 1, 64, seed=1)
        assert np.array_equal(img[-1], a_img[i]) and np.array_equal(mask[-1], a_mask[i])
    c_img, _ = generate(domain, 3, 64, seed=2)
    assert not np.array_equal(a_img, c_img)


def test_generate_pair_matches_generate() -> None:
    index = DOMAINS.index("synth-he")
    img, mask = generate_pair("synth-he", np.random.default_rng([4, index, 2]), 64)
    imgs, masks = generate("synth-he", 3, 64, seed=4)
    assert np.array_equal(img, imgs[2]) and np.array_equal(mask, masks[2])


def test_domains_use_distinct_streams() -> None:
    images = [generate(d, 1, 64, seed=0)[0][0] for d in DOMAINS]
    assert all(not np.array_equal(images[i], images[j]) for i in range(5) for j in range(i + 1, 5))


@pytest.mark.parametrize("size", [64, 100])
@pytest.mark.parametrize("domain", DOMAINS)
def test_dtypes_ranges_shapes(domain: str, size: int) -> None:
    imgs, masks = generate(domain, 4, size, seed=3)
    assert imgs.shape == masks.shape == (4, size, size)
    assert imgs.dtype == np.float32 and masks.dtype == np.uint8
    assert np.isfinite(imgs).all() and imgs.min() >= 0.0 and imgs.max() <= 1.0
    assert set(np.unique(masks).tolist()) <= {0, 1}
    assert (masks.reshape(4, -1).sum(1) > 0).all()
    # 8-bit quantised: lossless round trip through uint8
    assert np.array_equal(np.round(imgs * 255).astype(np.uint8) / np.float32(255), imgs)


def test_zero_images() -> None:
    imgs, masks = generate("synth-em", 0, 64)
    assert imgs.shape == masks.shape == (0, 64, 64)


@pytest.mark.parametrize("domain", DOMAINS)
def test_foreground_fraction(domain: str, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    _, masks = batches[domain]
    lo, hi = FG_RANGE[domain]
    assert lo <= masks.mean() <= hi
    assert (masks.reshape(8, -1).sum(1) > 0).all()


def _contrast(imgs: np.ndarray, masks: np.ndarray) -> tuple[float, float, float]:
    """Mean foreground intensity, mean background intensity, and their difference."""
    fg = float(imgs[masks > 0].mean())
    bg = float(imgs[masks == 0].mean())
    return fg, bg, fg - bg


def test_domains_differ(batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    stats = {d: _contrast(*batches[d]) for d in DOMAINS}
    fg_frac = {d: float(batches[d][1].mean()) for d in DOMAINS}
    # polarity: fluorescence is bright on dark; EM and H&E are dark on light
    for d in ("synth-fluo", "synth-nuclei"):
        assert stats[d][2] > 0.25 and stats[d][1] < 0.12
    for d in ("synth-em", "synth-he"):
        assert stats[d][2] < -0.15 and stats[d][1] > 0.45
    # phase contrast: intensity alone is ambiguous (weak, mixed contrast on mid-grey)
    assert abs(stats["synth-phase"][2]) < 0.15 and 0.35 < stats["synth-phase"][1] < 0.65
    # fluo vs nuclei: same polarity, different object size
    assert _mean_object_area(batches["synth-fluo"][1]) > 2.5 * _mean_object_area(batches["synth-nuclei"][1])
    # EM vs H&E: same polarity, different foreground fraction
    assert fg_frac["synth-em"] < 0.6 * fg_frac["synth-he"]
    # every pair is told apart by at least one simple statistic
    area = {d: _mean_object_area(batches[d][1]) for d in DOMAINS}
    for i, a in enumerate(DOMAINS):
        for b in DOMAINS[i + 1 :]:
            separated = (
                abs(stats[a][1] - stats[b][1]) > 0.1
                or abs(stats[a][2] - stats[b][2]) > 0.15
                or max(fg_frac[a], fg_frac[b]) > 1.6 * min(fg_frac[a], fg_frac[b])
                or max(area[a], area[b]) > 2.0 * min(area[a], area[b])
            )
            assert separated, (a, b)


def _mean_object_area(masks: np.ndarray) -> float:
    from scipy import ndimage

    counts = [ndimage.label(m)[1] for m in masks]
    return float(masks.sum()) / max(1, sum(counts))


def test_objects_keep_pixel_scale() -> None:
    # a larger image shows more nuclei, not bigger ones
    small = _mean_object_area(generate("synth-nuclei", 4, 128, seed=0)[1])
    large = _mean_object_area(generate("synth-nuclei", 2, 512, seed=0)[1])
    assert 0.6 < large / small < 1.6


def test_unknown_domain_raises() -> None:
    with pytest.raises(ValueError, match="synth-bogus") as info:
        generate("synth-bogus", 1)
    assert all(d in str(info.value) for d in DOMAINS)
    with pytest.raises(ValueError, match="synth-bogus"):
        generate_pair("synth-bogus", np.random.default_rng(0))


def test_no_torch_dependency() -> None:
    assert "torch" not in vars(synth)
