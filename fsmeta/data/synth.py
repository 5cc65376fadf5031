"""Procedural microscopy domains: seeded generators of (image, mask) pairs.

These are the embedded default data of the tool, used when no real data set is
prepared: a meta-learner is pre-trained on four domains and fine-tuned on the
fifth with a handful of images. The domains therefore differ on purpose in
intensity polarity, texture, object size, density and foreground fraction, so
that a model trained on the other four does poorly on the held-out one until it
is fine-tuned. All images are single-channel.

``synth-fluo``   BBBC005-like: bright, blurred, roundish fluorescent cells
                 (15-40 px, 5-30 per 256² image) on a dark noisy background;
                 the focus blur varies from image to image.
``synth-nuclei`` BBBC039-like: dense small nuclei (8-18 px, 30-120 per 256²),
                 many touching, of varied brightness including dim ones that
                 barely rise above the dark background.
``synth-em``     EPFL hippocampus / ssTEM-like electron microscopy: grey grainy
                 cytoplasm crossed by dark curvy membranes, vesicles, and dark
                 oval mitochondria with cristae stripes (the foreground, ~3-8 %).
                 Membranes are as dark as mitochondria, so darkness alone fails.
``synth-he``     TNBC-like H&E histology in grey: light stroma with wavy fibres
                 and pale lumina, dark irregular nuclei (8-25 px), partly
                 clustered, tumour nuclei textured and paler, lymphocytes small
                 and very dark (~8-15 % foreground).
``synth-phase``  Phase-contrast-like: mid-grey background with uneven
                 illumination; spread cells are darker than the background with
                 a bright halo outside, rounded cells are bright with a dark rim,
                 so neither bright nor dark pixels alone mark the foreground.

Objects keep a physical pixel scale: a larger ``size`` shows more objects (counts
grow with the area), not bigger ones. Images are quantised to multiples of 1/255
(``np.round(img * 255).astype(np.uint8)`` is lossless), as from an 8-bit camera.

Reproducibility: image ``i`` comes from ``np.random.default_rng([seed, domain
index, i])``. To keep results bit-identical across machines the generators use
only IEEE-exact arithmetic on arrays (+, -, *, /, sqrt, comparisons), avoid
array transcendental functions and float reductions (whose SIMD code paths
differ between CPUs), and build blur kernels from float32-rounded weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from scipy import ndimage

DOMAINS: tuple[str, ...] = ("synth-fluo", "synth-nuclei", "synth-em", "synth-he", "synth-phase")

DESCRIPTIONS: dict[str, str] = {
    "synth-fluo": "BBBC005-like fluorescent cells: bright blurred round cells, 15-40 px, on dark background",
    "synth-nuclei": "BBBC039-like nuclei: dense small bright nuclei, 8-18 px, touching, some dim",
    "synth-em": "ssTEM-like electron microscopy: dark textured mitochondria among dark membranes (~5% fg)",
    "synth-he": "TNBC-like H&E in grey: dark irregular nuclei, 8-25 px, clustered, on fibrous stroma",
    "synth-phase": "phase-contrast-like: dark cells with bright halos and bright rounded cells on mid-grey",
}

_REF = 256  # object counts are stated per 256×256 image


def _check_domain(domain: str) -> int:
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    return DOMAINS.index(domain)


def _count(rng: np.random.Generator, lo: int, hi: int, size: int) -> int:
    """Object count drawn for a 256² image and scaled to the image area; at least one."""
    return max(1, int(round(int(rng.integers(lo, hi + 1)) * (size / _REF) ** 2)))


@lru_cache(maxsize=32)
def _cubic(cell: int) -> np.ndarray:
    """(cell, 4) Keys cubic weights for upsampling by an integer factor, one row per sub-pixel
    phase, scaled so the upsampled iid noise has unit variance at every phase."""
    rows = []
    for p in range(cell):
        t = (p + 0.5) / cell
        w = [(-t**3 + 2 * t * t - t) / 2, (3 * t**3 - 5 * t * t + 2) / 2, (-3 * t**3 + 4 * t * t + t) / 2, (t**3 - t * t) / 2]
        norm = math.sqrt(math.fsum(x * x for x in w))
        rows.append([x / norm for x in w])
    return np.array(rows, np.float32)


def _field(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Smooth stationary random field, unit std, correlation length ~cell px.

    Upsampling low-resolution noise is far cheaper than a large-sigma Gaussian; the
    separable cubic is done with broadcasting (fixed summation order, no BLAS)."""
    m = -(-size // cell) + 3
    low = rng.standard_normal((m, m), dtype=np.float32)
    w = _cubic(cell)
    rows = sum(w[None, :, k, None] * low[k : k + m - 3, None, :] for k in range(4)).reshape(-1, m)[:size]
    out = sum(w[None, None, :, k] * rows[:, k : k + m - 3, None] for k in range(4))
    return out.reshape(size, -1)[:, :size]


@lru_cache(maxsize=64)
def _kernel(sigma: float) -> np.ndarray:
    # float32-rounded weights and an exact sum make the kernel identical even where libm differs
    r = max(1, math.ceil(3.0 * sigma))
    w = [float(np.float32(math.exp(-0.5 * (i / sigma) ** 2))) for i in range(-r, r + 1)]
    total = math.fsum(w)
    return np.array([x / total for x in w])


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    sigma = round(sigma * 20) / 20  # few distinct kernels, all cached
    if sigma <= 0:
        return img
    k = _kernel(sigma)
    out = ndimage.correlate1d(img, k, axis=0, mode="reflect")
    return ndimage.correlate1d(out, k, axis=1, mode="reflect")


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _triangle(t: np.ndarray) -> np.ndarray:
    """Periodic wave in [0, 1] with period 1: a sine substitute that is exact on every CPU."""
    return np.abs(2.0 * (t - np.floor(t)) - 1.0)


def _uniform_sampler(size: int) -> Callable[[np.random.Generator, int], np.ndarray]:
    return lambda rng, m: rng.uniform(0, size - 1, (m, 2))


def _place(
    rng: np.random.Generator,
    radii: np.ndarray,
    size: int,
    overlap: float,
    sampler: Callable[[np.random.Generator, int], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (k, 2) for objects of the given radii and the indices kept.

    A candidate is rejected when it lies closer than overlap·(r_i + r_j) to an
    earlier centre; overlap < 1 lets objects touch. The first object is always
    kept and all centres lie in the frame, so a mask is never empty."""
    sampler = sampler or _uniform_sampler(size)
    py, px, rs = np.empty(len(radii)), np.empty(len(radii)), np.empty(len(radii))
    keep: list[int] = []
    for j, r in enumerate(radii):
        cand = np.clip(sampler(rng, 12), 0, size - 1)
        k = len(keep)
        if k:
            d2 = (cand[:, :1] - py[:k]) ** 2 + (cand[:, 1:] - px[:k]) ** 2
            ok = np.flatnonzero((d2 >= (overlap * (r + rs[:k])) ** 2).all(1))
            if ok.size == 0:
                continue
            cand = cand[ok]
        py[k], px[k], rs[k] = cand[0, 0], cand[0, 1], r
        keep.append(j)
    return np.stack([py[: len(keep)], px[: len(keep)]], 1), np.array(keep, dtype=int)


def _shape(rng: np.random.Generator, n: int, irregular: float) -> np.ndarray:
    """Per object: unit direction (c, s) and harmonic boundary coefficients for k = 2, 3."""
    d = rng.standard_normal((n, 2))
    d /= np.sqrt((d * d).sum(1, keepdims=True)) + 1e-12
    return np.concatenate([d, rng.uniform(-irregular, irregular, (n, 4))], axis=1)


def _blob(
    cy: float, cx: float, a: float, b: float, shape: np.ndarray, size: int, pad: float = 1.0
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray]:
    """Local frame of one star-shaped ellipse with semi-axes a (along shape's direction) and b.

    Returns the bounding slices, rho (< 1 inside, 1 on the wavy boundary) and the
    axis coordinates u, v normalised by a and b. Harmonics are expanded in
    cos/sin of the angle via Chebyshev identities so no arctan/cos is needed."""
    c, s, h2c, h2s, h3c, h3s = shape
    ext = max(a, b) * (1.0 + abs(h2c) + abs(h2s) + abs(h3c) + abs(h3s)) * pad + 2.0
    y0, y1 = max(0, int(cy - ext)), min(size, int(cy + ext) + 2)
    x0, x1 = max(0, int(cx - ext)), min(size, int(cx + ext) + 2)
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
    u = (dx * np.float32(c) + dy * np.float32(s)) * np.float32(1.0 / a)
    v = (dy * np.float32(c) - dx * np.float32(s)) * np.float32(1.0 / b)
    r = np.sqrt(u * u + v * v) + np.float32(1e-6)
    cu, sv = u / r, v / r
    edge = 1.0 + h2c * (cu * cu - sv * sv) + h2s * 2.0 * cu * sv
    edge = edge + h3c * cu * (4.0 * cu * cu - 3.0) + h3s * sv * (3.0 - 4.0 * sv * sv)
    return (slice(y0, y1), slice(x0, x1)), r / edge.astype(np.float32), u, v


def _finish(rng: np.random.Generator, img: np.ndarray, sigma: float, read: float, shot: float) -> np.ndarray:
    """Optical blur, read + shot noise, clipping and 8-bit quantisation."""
    img = _blur(img.astype(np.float32), sigma)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    img = img + noise * (np.float32(read) + np.float32(shot) * np.sqrt(np.clip(img, 0.0, None)))
    return (np.round(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _fluo(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    img = rng.uniform(0.02, 0.08) + 0.015 * _field(rng, size, 64)
    mask = np.zeros((size, size), np.uint8)
    n = _count(rng, 5, 30, size)
    rad = rng.uniform(7.5, 20.0, n)
    centres, keep = _place(rng, rad, size, 0.85)
    shapes = _shape(rng, n, 0.05)
    aspect = rng.uniform(1.0, 1.3, n)
    bright = rng.uniform(0.4, 0.95, n)
    texture = 1.0 + 0.12 * _field(rng, size, 5)
    for (cy, cx), j in zip(centres, keep):
        sl, rho, _, _ = _blob(cy, cx, rad[j] * aspect[j], rad[j] / aspect[j], shapes[j], size)
        inside = rho < 1.0
        # dome profile: fluorescence integrates over cell thickness, brightest in the middle
        val = bright[j] * (0.7 + 0.3 * (1.0 - rho * rho)) * texture[sl]
        img[sl] = np.where(inside, np.maximum(img[sl], val), img[sl])
        mask[sl] |= inside
    return _finish(rng, img, rng.uniform(0.8, 2.5), rng.uniform(0.008, 0.025), 0.03), mask


def _nuclei(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    img = rng.uniform(0.01, 0.05) + 0.01 * _field(rng, size, 48)
    mask = np.zeros((size, size), np.uint8)
    n = _count(rng, 30, 120, size)
    rad = rng.uniform(4.0, 9.0, n)
    centres, keep = _place(rng, rad, size, 0.7)  # < 1: nuclei touch and slightly overlap
    shapes = _shape(rng, n, 0.06)
    aspect = rng.uniform(1.0, 1.4, n)
    dim = rng.random(n) < 0.15
    bright = np.where(dim, rng.uniform(0.05, 0.14, n), rng.uniform(0.25, 0.95, n))
    chromatin = 1.0 + 0.15 * _field(rng, size, 3)
    for (cy, cx), j in zip(centres, keep):
        sl, rho, _, _ = _blob(cy, cx, rad[j] * aspect[j], rad[j] / aspect[j], shapes[j], size)
        inside = rho < 1.0
        val = img[sl] + bright[j] * (0.85 + 0.15 * (1.0 - rho * rho)) * chromatin[sl]
        img[sl] = np.where(inside, np.maximum(img[sl], val), img[sl])
        mask[sl] |= inside
    return _finish(rng, img, rng.uniform(0.6, 1.2), rng.uniform(0.005, 0.015), 0.02), mask


def _membranes(rng: np.random.Generator, size: int, cell: int, width: float) -> np.ndarray:
    """Thin curvy closed lines: the zero level set of a smooth field, |f|/|∇f| ≈ distance in px."""
    f = _field(rng, size, cell)
    gy, gx = np.gradient(f)
    dist = np.abs(f) / np.sqrt(gx * gx + gy * gy + np.float32(1e-4))
    return np.clip(1.0 - dist / np.float32(width), 0.0, 1.0)


def _em(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    img = rng.uniform(0.5, 0.66) + 0.05 * _field(rng, size, 48) + 0.04 * _field(rng, size, 4)
    lines = np.maximum(_membranes(rng, size, 28, rng.uniform(1.2, 2.2)), _membranes(rng, size, 64, 1.8))
    img -= rng.uniform(0.25, 0.4) * lines
    mask = np.zeros((size, size), np.uint8)
    # vesicles: small dark rings, not foreground; they stop "dark round = mitochondrion"
    nv = _count(rng, 10, 50, size)
    circle = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    for cy, cx, r in zip(rng.uniform(0, size - 1, nv), rng.uniform(0, size - 1, nv), rng.uniform(2.0, 4.0, nv)):
        sl, rho, _, _ = _blob(cy, cx, r, r, circle, size)
        img[sl] -= 0.25 * np.clip(1.0 - np.abs(rho - 0.85) * 5.0, 0.0, 1.0)
    n = _count(rng, 5, 14, size)
    a = rng.uniform(9.0, 25.0, n)
    b = rng.uniform(4.5, 8.0, n)
    centres, keep = _place(rng, a, size, 0.8)
    shapes = _shape(rng, n, 0.04)
    level = rng.uniform(0.22, 0.38, n)
    period = rng.uniform(3.5, 6.0, n)
    grain = 0.04 * _field(rng, size, 2)
    for (cy, cx), j in zip(centres, keep):
        sl, rho, u, _ = _blob(cy, cx, a[j], b[j], shapes[j], size)
        inside = rho < 1.0
        # cristae: stripes across the long axis; outer double membrane: darker rim
        cristae = _smoothstep(3.0 * (0.45 - _triangle(u * np.float32(a[j] / period[j]))))
        rim = _smoothstep((rho - 0.75) * 5.0)
        val = level[j] - 0.12 * cristae - 0.1 * rim + grain[sl]
        img[sl] = np.where(inside, val, img[sl])
        mask[sl] |= inside
    return _finish(rng, img, rng.uniform(0.6, 1.0), rng.uniform(0.03, 0.05), 0.0), mask


def _he(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    stroma = rng.uniform(0.62, 0.76)
    img = stroma + 0.04 * _field(rng, size, 40) + 0.03 * _field(rng, size, 2)
    # collagen: thin wavy fibres in two crossing families, each present only in patches
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for c, s in _shape(rng, 2, 0.0)[:, :2]:
        phase = (xx * np.float32(c) + yy * np.float32(s)) / np.float32(rng.uniform(4.0, 8.0))
        fib = _smoothstep(4.0 * (_triangle(phase + 0.6 * _field(rng, size, 24)) - 0.6))
        img -= 0.14 * fib * _smoothstep(_field(rng, size, 48))
    lumen = _smoothstep(3.0 * (_field(rng, size, 64) - 1.7))  # pale lumina / fat with a soft edge
    img = img + (0.9 - img) * lumen
    mask = np.zeros((size, size), np.uint8)
    n = _count(rng, 25, 55, size)
    lymph = rng.random(n) < 0.3
    rad = np.where(lymph, rng.uniform(4.0, 5.5, n), rng.uniform(5.0, 12.5, n))
    clusters = rng.uniform(0, size - 1, (max(1, _count(rng, 1, 4, size)), 2))

    def sampler(r: np.random.Generator, m: int) -> np.ndarray:
        near = clusters[r.integers(0, len(clusters), m)] + r.normal(0.0, 22.0, (m, 2))
        return np.where(r.random((m, 1)) < 0.55, near, r.uniform(0, size - 1, (m, 2)))

    centres, keep = _place(rng, rad, size, 0.75, sampler)
    shapes = _shape(rng, n, 0.12)
    shapes[lymph, 2:] *= 0.3  # lymphocytes are round
    aspect = np.where(lymph, 1.05, rng.uniform(1.0, 1.7, n))
    tone = np.where(lymph, rng.uniform(0.12, 0.22, n), rng.uniform(0.22, 0.42, n))
    chromatin = 0.07 * _field(rng, size, 3)
    cyto = np.zeros((size, size), np.float32)
    for (cy, cx), j in zip(centres, keep):
        sl, rho, _, _ = _blob(cy, cx, rad[j] * aspect[j], rad[j] / aspect[j], shapes[j], size, pad=2.0)
        inside = rho < 1.0
        if not lymph[j]:  # eosinophilic cytoplasm: a slightly darker zone around tumour nuclei
            cyto[sl] = np.maximum(cyto[sl], np.clip(2.0 - rho, 0.0, 1.0))
        # vesicular tumour nuclei: darker rim (membrane-bound chromatin), paler centre
        val = tone[j] + (0.0 if lymph[j] else 0.08) * (1.0 - _smoothstep((rho - 0.4) * 2.0)) + chromatin[sl]
        img[sl] = np.where(inside, val, img[sl])
        mask[sl] |= inside
    img = np.where(mask > 0, img, img - 0.08 * cyto)
    return _finish(rng, img, rng.uniform(0.5, 1.0), 0.012, 0.015), mask


def _phase(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    bg = rng.uniform(0.42, 0.55)
    img = bg + 0.05 * _field(rng, size, 96) + 0.012 * _field(rng, size, 6)
    mask = np.zeros((size, size), np.uint8)
    n = _count(rng, 6, 18, size)
    rounded = rng.random(n) < 0.25
    a = np.where(rounded, rng.uniform(6.0, 11.0, n), rng.uniform(12.0, 28.0, n))
    aspect = np.where(rounded, rng.uniform(1.0, 1.15, n), rng.uniform(1.2, 2.5, n))
    b = a / aspect
    centres, keep = _place(rng, (a + b) / 2, size, 0.9)
    shapes = _shape(rng, n, 0.16)
    shapes[rounded, 2:] *= 0.2
    halo_px = rng.uniform(2.0, 4.0, n)
    halo = rng.uniform(0.15, 0.3, n)
    depth = rng.uniform(0.08, 0.2, n)
    granules = _field(rng, size, 3)
    for (cy, cx), j in zip(centres, keep):
        sl, rho, _, _ = _blob(cy, cx, a[j], b[j], shapes[j], size, pad=1.0 + 2.0 * halo_px[j] / b[j])
        inside = rho < 1.0
        w = np.float32(halo_px[j] / ((a[j] + b[j]) / 2))
        ring = _smoothstep(1.0 - np.abs(rho - 1.0 - w) / w)  # halo outside the boundary
        if rounded[j]:  # phase-bright rounded cell with a dark rim just inside the edge
            val = img[sl] + 0.25 + 0.08 * (1.0 - rho) - 0.3 * _smoothstep((rho - 0.75) * 6.0)
            ring = ring * 1.5
        else:  # spread cell: darker than background, granular, brightest halo
            val = img[sl] - depth[j] * (0.6 + 0.4 * _smoothstep(1.5 * (1.0 - rho))) + 0.04 * granules[sl]
        img[sl] = np.where(inside, val, np.maximum(img[sl], img[sl] + halo[j] * ring))
        mask[sl] |= inside
    return _finish(rng, img, rng.uniform(0.7, 1.1), 0.012, 0.01), mask


_GENERATORS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "synth-fluo": _fluo,
    "synth-nuclei": _nuclei,
    "synth-em": _em,
    "synth-he": _he,
    "synth-phase": _phase,
}


def generate_pair(domain: str, rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One (image, mask): image float32 (size, size) in [0, 1]; mask uint8 (size, size) in {0, 1}."""
    _check_domain(domain)
    if size < 16:
        raise ValueError(f"synthetic image size must be at least 16, got {size}")
    img, mask = _GENERATORS[domain](rng, int(size))
    return img, mask


def generate(domain: str, n: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n pairs stacked: images float32 (n, size, size) in [0, 1], masks uint8 (n, size, size) in {0, 1}.

    Image i is generated from ``np.random.default_rng([seed, domain index, i])``,
    so it does not depend on n and is bit-identical across runs and machines."""
    index = _check_domain(domain)
    if n < 0:
        raise ValueError(f"number of images must be >= 0, got {n}")
    images = np.empty((n, size, size), np.float32)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        images[i], masks[i] = generate_pair(domain, np.random.default_rng([seed, index, i]), size)
    return images, masks
