"""Set-level selection: typical members of distinct clusters of θ′'s features (``typiclust``).

A score per candidate ranks the candidates one by one; at a budget of a few images
what matters is that the chosen set covers the target's variety and that each member
is representative, not an outlier (Hacohen, Dekel & Weinshall, "Active Learning on a
Budget: Opposite Strategies Suit High and Low Budgets", ICML 2022 — TypiClust). Here:

1. Every candidate (a grid patch, or an image: the mean over its patches, or the
   whole image with ``select.image_score = whole``) gets θ′'s bottleneck features,
   averaged over space and scaled to unit length, and θ′'s predicted foreground share
   (pixels with p ≥ 0.5) — θ′ is the pretext model: nothing here reads a mask.
2. Candidates θ′ predicts to hold cells (share ≥ ``select.min_predicted_foreground``)
   are eligible; when fewer than the budget are, every candidate is (eligible first).
   A patch of empty background costs an annotator as much as one full of cells and
   teaches little; on TNBC and EM consistency's picks were 100 % background at K=1.
3. k-means (k = the budget; k-means++ seeding from the seed, Lloyd's iterations) on
   the eligible features; from each cluster its most typical member, typicality =
   1 / mean distance to its ``min(20, n−1)`` nearest neighbours within the cluster,
   larger clusters first. The rest of the ranking follows by typicality over all candidates.

The choice depends on the budget (k = budget), so its rankings are cached per budget.
"""

from __future__ import annotations

import numpy as np

KNN = 20  # TypiClust's neighbours for typicality
KMEANS_ITERATIONS = 100
REFERENCE = 2000  # typicality is measured against at most this many members of a cluster (a seeded sample)


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances, as |a|² + |b|² − 2ab (no (n, m, C) temporary)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def kmeans(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster labels (n,) of Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007),
    seeded by ``seed``; ``k`` ≤ n. Deterministic for a given seed and input."""
    n = len(features)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 ≤ k ≤ n, got k={k}, n={n}")
    rng = np.random.default_rng([seed, 2022])
    x = features.astype(np.float64)
    picks = [int(rng.integers(n))]
    d2 = squared_distances(x, x[picks[0]][None])[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        pick = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        picks.append(pick)
        d2 = np.minimum(d2, squared_distances(x, x[pick][None])[:, 0])
    c = x[picks].copy()
    labels = np.full(n, -1)
    for _ in range(KMEANS_ITERATIONS):
        dist = squared_distances(x, c)
        new = dist.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(0)
            else:  # an emptied cluster takes the point farthest from its centre
                far = int(dist[np.arange(n), labels].argmax())
                c[j], labels[far] = x[far], j
    return labels


def typicality(features: np.ndarray, seed: int = 0, knn: int = KNN) -> np.ndarray:
    """1 / mean Euclidean distance of each point to its ``min(knn, m−1)`` nearest others among
    ``m`` reference points (all of them, or a seeded sample of :data:`REFERENCE` for a large set);
    a lone point gets 1."""
    n = len(features)
    if n == 1:
        return np.ones(1)
    x = features.astype(np.float64)
    ref = np.arange(n) if n <= REFERENCE else np.sort(np.random.default_rng([seed, 2023]).choice(n, REFERENCE, replace=False))
    d = np.sqrt(squared_distances(x, x[ref]))
    d[ref, np.arange(len(ref))] = np.inf  # a point is not its own neighbour
    m = min(knn, len(ref) - 1)
    near = np.partition(d, m - 1, axis=1)[:, :m]
    return 1.0 / np.maximum(near.mean(1), 1e-12)


def typiclust_order(features: np.ndarray, foreground: np.ndarray, budget: int, seed: int,
                    min_foreground: float) -> np.ndarray:
    """The candidates' order (a permutation of ``range(n)``): the ``budget`` picks first (one
    per cluster, larger clusters first), then the other eligible candidates cluster by cluster
    by typicality, then the rest by predicted foreground share. See the module's steps.

    Args:
        features: (n, C) unit-length features of the candidates.
        foreground: (n,) θ′'s predicted foreground share of each.
        budget: how many are chosen (k of k-means).
        min_foreground: the predicted share that makes a candidate eligible.
    """
    n = len(features)
    if not 1 <= budget <= n:
        raise ValueError(f"a budget of {budget} from {n} candidates")
    eligible = np.nonzero(foreground >= min_foreground)[0]
    if len(eligible) < budget:
        eligible = np.arange(n)
    x = features[eligible]
    labels = kmeans(x, budget, seed)
    sizes = np.bincount(labels, minlength=budget)
    picks, others = [], []
    for j in sorted(range(budget), key=lambda j: (-sizes[j], j)):
        members = np.nonzero(labels == j)[0]
        if len(members) == 0:
            continue
        by_typicality = members[np.argsort(-typicality(x[members], seed), kind="stable")]
        picks.append(int(eligible[by_typicality[0]]))
        others += [int(eligible[m]) for m in by_typicality[1:]]
    chosen = set(picks) | set(others)
    rest = [int(i) for i in np.argsort(-foreground, kind="stable") if int(i) not in chosen]
    return np.array(picks + others + rest, dtype=np.int64)
