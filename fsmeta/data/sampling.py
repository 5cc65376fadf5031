"""Seeded draws: K-shot support sets, the 2023 protocol's test split, and meta-training tasks.

Every draw is a pure function of its seeds, so a result never depends on
scheduling, on how many workers ran, or on whether a run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsmeta.errors import FsmetaError


def protocol_split(n_images: int, protocol: str, test_fraction: float = 0.2, split_seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(pool, fixed test) image indices of a target.

    ``2020``: the pool is every image and the test set is whatever the support
    set leaves (returned as None). ``2023``: a fixed seeded ``test_fraction``
    of the images is the test set; the rest is the pool.
    """
    if protocol == "2020":
        return np.arange(n_images), None
    if protocol != "2023":
        raise FsmetaError(f"unknown evaluation protocol {protocol!r}; use 2020 or 2023")
    n_test = max(1, int(round(test_fraction * n_images)))
    if n_test >= n_images:
        raise FsmetaError(f"a {test_fraction:.0%} test split of {n_images} image(s) leaves no pool to draw from")
    order = np.random.default_rng([split_seed, 2023]).permutation(n_images)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def draw_support(pool: np.ndarray, shots: int, seed: int, target: str = "target") -> np.ndarray:
    """K images of the pool, drawn by ``seed``.

    The draws are nested across K for a given seed (the 1-shot image is among
    the 3-shot images, and so on), so curves over K compare like with like.
    """
    if shots < 1:
        raise FsmetaError(f"K must be at least 1, got {shots}")
    if shots > len(pool):
        raise FsmetaError(f"K={shots} is larger than the pool of {len(pool)} image(s) of target {target}")
    order = np.random.default_rng([seed, 7919]).permutation(len(pool))
    return np.asarray(pool)[order[:shots]]


def held_out_images(n_images: int, pool: np.ndarray, fixed_test: np.ndarray | None, support: np.ndarray) -> np.ndarray:
    """The images a fine-tuned model is scored on: the fixed split, or every non-support image (2020)."""
    if fixed_test is not None:
        return fixed_test
    return np.setdiff1d(np.arange(n_images), support)


@dataclass(frozen=True)
class TaskSpec:
    """What one source's inner loop trains on in one meta-iteration (Algorithm 1, lines 6–10).

    ``m`` is the labelled source; ``n`` lends unlabelled crops to the entropy
    term and ``p`` to the distillation term (indices into the source list).
    """

    iteration: int
    m: int
    labelled: np.ndarray  # crop rows of source m
    n: int
    unlabelled_n: np.ndarray  # crop rows of source n
    p: int
    unlabelled_p: np.ndarray  # crop rows of source p
    seed: int = 0  # the run's seed (with iteration and m, it seeds the task's augmentation)


def _choose(rng: np.random.Generator, pool_size: int, k: int) -> np.ndarray:
    return rng.choice(pool_size, size=k, replace=pool_size < k)


def make_task(seed: int, iteration: int, m: int, pool_sizes: list[int], shots: int) -> TaskSpec:
    """The task of source ``m`` at ``iteration``, a pure function of (seed, iteration, m).

    n and p are drawn independently and uniformly from the other sources. With a
    single source there is no other: n = p = m (the regularisers then act on m itself).
    """
    rng = np.random.default_rng([seed, iteration, m])
    others = [j for j in range(len(pool_sizes)) if j != m] or [m]
    n = int(others[rng.integers(len(others))])
    p = int(others[rng.integers(len(others))])
    return TaskSpec(
        iteration=iteration,
        m=m,
        labelled=_choose(rng, pool_sizes[m], shots),
        n=n,
        unlabelled_n=_choose(rng, pool_sizes[n], shots),
        p=p,
        unlabelled_p=_choose(rng, pool_sizes[p], shots),
        seed=seed,
    )


def batch_stream(n: int, batch_size: int, key: tuple[int, ...] | list[int]):
    """Row batches of ``batch_size`` over ``n`` items for a step budget: seeded permutations
    (``default_rng([*key, epoch])``) concatenated, so a batch may span two epochs and every
    batch is full. Endless; the caller takes as many as it has steps."""
    order = np.zeros(0, dtype=np.int64)
    epoch = 0
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, np.random.default_rng([*key, epoch]).permutation(n)])
            epoch += 1
        batch, order = order[:batch_size], order[batch_size:]
        yield batch

