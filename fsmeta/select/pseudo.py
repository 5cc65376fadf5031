"""Pseudo-labels for the pretext task (Dawoud et al. 2023, §3.2, Fig. 2).

Classical segmentation, no annotation: histogram equalisation, an *inverse*
threshold (foreground where the equalised value is ≤ γ, since the paper's
objects — nuclei in H&E, mitochondria in EM — are darker than their
surroundings), then a 2×2 dilation. K-means with k = 2 (the darker cluster is
foreground) is the paper's alternative (its Table 3).

γ lives on the equalised scale [0, 1]: an equalised value is the fraction of
the image's pixels at or below it, so γ ≈ "the darkest γ of the pixels are
foreground" (before dilation). Per data set it is configuration
(``select.gamma``); ``gamma="auto"`` picks it per image (:func:`auto_gamma`).

Polarity: fluorescence (BBBC005, BBBC039) shows BRIGHT objects on a dark
background, where the inverse threshold would label the background. For
``polarity="bright"`` the image is inverted first (``1 - x``), so the same
pipeline — and the same meaning of γ — applies.
"""

from __future__ import annotations

import numpy as np
from skimage import exposure, filters

from fsmeta.errors import FsmetaError

POLARITIES = ("dark", "bright")
PSEUDO_METHODS = ("threshold", "kmeans")
# A lab's own images (a folder, or a data set imported from one) have no polarity entry: it is read
# off their intensity histograms. Sparse bright objects on a dark background (fluorescence) give a
# long bright tail, a skewness above 1 — "highly skewed" by the usual rule of thumb (Bulmer,
# Principles of Statistics, 1979) — in the median sampled image; anything else stays "dark", the
# papers' convention. Measured (median over 16 images): TNBC −2.0, EM −0.15, ssTEM −0.35,
# synth-em −0.91, synth-he −1.36, synth-phase +0.54 (all dark); synth-fluo +1.98,
# synth-nuclei +2.62 (bright); TNBC with its intensities inverted +2.0.
BRIGHT_SKEW = 1.0
_SKEW_PIXELS = 1 << 18  # pixels read per image (a strided subsample of larger images)


def _oriented(image: np.ndarray, polarity: str) -> np.ndarray:
    if polarity not in POLARITIES:
        raise FsmetaError(f"polarity {polarity!r} is not 'dark' or 'bright'")
    x = np.asarray(image, dtype=np.float32)
    return np.float32(1.0) - x if polarity == "bright" else x


def equalise(image: np.ndarray, nbins: int = 256) -> np.ndarray:
    """Histogram-equalised image in [0, 1] (``skimage.exposure.equalize_hist``), float32.

    Shape: (H, W) → (H, W).
    """
    x = np.asarray(image, dtype=np.float32)
    if float(x.max()) == float(x.min()):
        # A constant image has no histogram to spread; equalize_hist would divide by zero.
        return np.ones_like(x)
    return exposure.equalize_hist(x, nbins=nbins).astype(np.float32)


def dilate_2x2(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by a 2×2 square of ones, as ``cv2.dilate(m, np.ones((2, 2)))``.

    The anchor is the square's lower-right cell, so a lone pixel at (r, c) becomes
    the block (r..r+1, c..c+1): every foreground pixel also lights its right,
    lower and lower-right neighbours (inside the image).
    """
    m = np.asarray(mask).astype(bool)
    out = m.copy()
    out[1:, :] |= m[:-1, :]
    out[:, 1:] |= m[:, :-1]
    out[1:, 1:] |= m[:-1, :-1]
    return out


def auto_gamma(image: np.ndarray, polarity: str = "dark") -> float:
    """γ for one image by Otsu, expressed on the equalised scale.

    Otsu's threshold ``t`` is found on the image's own intensities and γ is its
    equalised value (the fraction of pixels ≤ ``t``), so thresholding the
    equalised image at γ is thresholding the image at Otsu's ``t``.

    Why not Otsu on the equalised image itself: equalisation flattens the
    histogram by construction, and Otsu on a flat histogram returns its middle,
    so it gives γ ≈ 0.5 on every image whatever it shows (measured 0.44-0.51 on
    all five synthetic domains; docs/selection.md).
    """
    x = _oriented(image, polarity)
    if float(x.max()) == float(x.min()):
        return 0.0
    t = filters.threshold_otsu(x, nbins=256)
    return float(np.count_nonzero(x <= t)) / x.size


def kmeans_foreground(image: np.ndarray, polarity: str = "dark", iterations: int = 50) -> np.ndarray:
    """k-means (k = 2) on pixel intensities; the darker cluster (brighter for ``polarity="bright"``) is foreground.

    One-dimensional Lloyd iterations started at the darkest and brightest
    intensity: deterministic, no random restarts needed in 1-D. Returns bool (H, W).
    """
    x = _oriented(image, polarity).astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return np.zeros(x.shape, dtype=bool)
    c0, c1 = lo, hi
    for _ in range(iterations):
        split = (c0 + c1) / 2.0
        dark = x <= split
        n0, n1 = np.count_nonzero(dark), np.count_nonzero(~dark)
        new0 = float(x[dark].mean()) if n0 else c0
        new1 = float(x[~dark].mean()) if n1 else c1
        if new0 == c0 and new1 == c1:
            break
        c0, c1 = new0, new1
    return x <= (c0 + c1) / 2.0


def pseudo_label(
    image: np.ndarray,
    gamma: float | str = 0.5,
    *,
    polarity: str = "dark",
    method: str = "threshold",
    dilate: bool = True,
) -> np.ndarray:
    """Pseudo-label (H, W) uint8 {0, 1} of one [0, 1] image.

    Args:
        image: (H, W) float in [0, 1].
        gamma: threshold on the equalised scale, or ``"auto"`` (:func:`auto_gamma`).
            Ignored by ``method="kmeans"``.
        polarity: ``"dark"`` objects on light (TNBC, EM, ssTEM) or ``"bright"``
            objects on dark (fluorescence); bright images are inverted first.
        method: ``"threshold"`` (equalise, inverse threshold, dilate) or ``"kmeans"``.
        dilate: apply the 2×2 dilation (both methods).
    """
    if method not in PSEUDO_METHODS:
        raise FsmetaError(f"pseudo-label method {method!r} is not one of {', '.join(PSEUDO_METHODS)}")
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 2:
        raise FsmetaError(f"pseudo-labels need a single-channel (H, W) image, got shape {x.shape}")
    if method == "kmeans":
        fg = kmeans_foreground(x, polarity)
    else:
        if isinstance(gamma, str):
            if gamma != "auto":
                raise FsmetaError(f"gamma must be a number in [0, 1] or 'auto', got {gamma!r}")
            gamma = auto_gamma(x, polarity)
        if not 0.0 <= float(gamma) <= 1.0:
            raise FsmetaError(f"gamma={gamma} must lie in [0, 1] (it is a value of the equalised image)")
        fg = equalise(_oriented(x, polarity)) <= np.float32(gamma)
    return (dilate_2x2(fg) if dilate else fg).astype(np.uint8)


def skewness(image: np.ndarray) -> float | None:
    """Sample skewness (the mean cubed z-score) of an image's intensities, on a strided subsample
    of at most ~2¹⁸ pixels; None for a constant image."""
    x = np.asarray(image)
    step = max(1, int(np.ceil(np.sqrt(x.shape[0] * x.shape[1] / _SKEW_PIXELS))))
    v = x[::step, ::step].astype(np.float64).ravel()
    sd = float(v.std())
    if sd == 0.0 or not np.isfinite(sd):
        return None
    return float(np.mean(((v - v.mean()) / sd) ** 3))


def choose_polarity(images: list[np.ndarray], where: str) -> tuple[str, str]:
    """``"bright"`` when the median skewness of ``images`` (a sample of one data set, [0, 1]) exceeds
    :data:`BRIGHT_SKEW`, else ``"dark"``; returns (polarity, reason)."""
    skews = [k for k in (skewness(im) for im in images) if k is not None]
    if not skews:
        return "dark", f"{where}: no image with contrast to read a polarity from; dark, the default"
    median = float(np.median(skews))
    chosen = "bright" if median > BRIGHT_SKEW else "dark"
    return chosen, (f"{where}: median intensity skewness {median:+.2f} over {len(skews)} sampled image(s) "
                    f"({'above' if chosen == 'bright' else 'not above'} {BRIGHT_SKEW:g}: "
                    f"{'bright objects on a dark background' if chosen == 'bright' else 'dark objects on a lighter background'})")
