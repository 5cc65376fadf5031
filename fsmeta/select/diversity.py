"""Set-level selection from θ′'s features: ``typiclust`` (typical members of distinct clusters) and ``coverage`` (greedy facility location, below).

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

Typiclust's choice depends on the budget (k = budget), so its rankings are cached per budget;
coverage's picks are nested, one ranking for every budget.
"""

from __future__ import annotations

import heapq

import numpy as np

KNN = 20  # TypiClust's neighbours for typicality
KMEANS_ITERATIONS = 100
REFERENCE = 2000  # typicality is measured against at most this many members of a cluster (a seeded sample)
COVERAGE_MEMORY = 256 * 2**20  # bytes: coverage keeps its (candidates × references) table up to this size
COVERAGE_CHUNK = 4096  # patches per similarity block (4096 × 2000 float64 = 64 MB)


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


# --- coverage: greedy facility location over the pool's patches --------------------------------
#
# Yang et al., "Suggestive Annotation: A Deep Active Learning Framework for Biomedical Image
# Segmentation" (MICCAI 2017), choose the images whose descriptors best *represent* the
# unannotated set: maximise F(S) = Σ_r max_{s ∈ S} sim(r, s), cosine similarity — a facility-
# location objective, monotone submodular, so the greedy choice is within 1 − 1/e of the best set
# (Nemhauser, Wolsey & Fisher 1978; Wei, Iyer & Bilmes, "Submodularity in data subset selection
# and active learning", ICML 2015). Here the represented points ("reference") are the pool's
# patches θ′ predicts to hold cells, so a set is judged by how well it covers the variety of
# what is to be segmented, not of the background; a candidate image counts by its best patch
# for each reference patch. Greedy picks are nested (the first k of the order are the greedy
# set of every budget k), so one ranking serves every budget, as a score's does.

def coverage_order(features: np.ndarray, owners: np.ndarray, foreground: np.ndarray, n_candidates: int,
                   seed: int, min_foreground: float, eligible: np.ndarray | None = None) -> np.ndarray:
    """The candidates' order (a permutation of ``range(n_candidates)``) by greedy facility location.

    Args:
        features: (P, C) unit-length features of the pool's patches.
        owners: (P,) the candidate each patch belongs to (an image, or the patch itself).
        foreground: (P,) θ′'s predicted foreground share of each patch.
        n_candidates: how many candidates; every one owns at least one patch.
        seed: the reference sample when more than :data:`REFERENCE` patches qualify.
        min_foreground: the predicted share that makes a patch a reference (when none does,
            every patch is one).
        eligible: (n_candidates,) bool, candidates ordered before the others (θ′ predicts cells
            in them); ``None``: all.

    Returns the greedy order over the eligible candidates, then over the rest (coverage carried
    on). Each step takes the largest marginal gain Σ_r max(0, best(c, r) − covered_r), ties to
    the lower index; computed lazily (Minoux 1978: a gain never grows as the set grows, so a
    stale gain bounds the fresh one), which picks what recomputing every gain would.
    """
    features, owners = np.asarray(features), np.asarray(owners, dtype=np.int64)
    if len(features) != len(owners) or len(owners) != len(foreground):
        raise ValueError("features, owners and foreground must have one row per patch")
    if n_candidates < 1 or len(owners) == 0 or owners.min() < 0 or owners.max() >= n_candidates \
            or np.bincount(owners, minlength=n_candidates).min() == 0:
        raise ValueError(f"every one of the {n_candidates} candidates must own at least one patch")
    ref = np.nonzero(foreground >= min_foreground)[0]
    if len(ref) == 0:
        ref = np.arange(len(features))
    if len(ref) > REFERENCE:
        ref = np.sort(np.random.default_rng([seed, 2017]).choice(ref, REFERENCE, replace=False))
    ref_t = np.ascontiguousarray(features[ref].T, dtype=np.float64)  # (C, R); the patches are cast a block at a time
    # a candidate covers a reference by its most similar patch; its patches, grouped
    grouped = np.argsort(owners, kind="stable")
    bounds = np.searchsorted(owners[grouped], np.arange(n_candidates + 1))
    # The (candidates, R) table of best similarities is kept when it fits COVERAGE_MEMORY,
    # else each row is recomputed when the greedy needs it: memory stays bounded for any pool
    # (a 100k-patch pool's table alone would be 1.6 GB). Both compute a row the same way.
    keep = n_candidates * len(ref) * 8 <= COVERAGE_MEMORY
    table = np.empty((n_candidates, len(ref))) if keep else None
    filled = np.zeros(n_candidates, dtype=bool)

    def row(c: int) -> np.ndarray:
        if table is not None and filled[c]:
            return table[c]
        patches = grouped[bounds[c]:bounds[c + 1]]
        out = np.zeros(len(ref))
        for start in range(0, len(patches), COVERAGE_CHUNK):
            block = features[patches[start:start + COVERAGE_CHUNK]].astype(np.float64)
            np.maximum(out, (block @ ref_t).max(0), out=out)
        if table is not None:
            table[c], filled[c] = out, True
        return out

    if eligible is None:
        eligible = np.ones(n_candidates, dtype=bool)
    order: list[int] = []
    covered = np.zeros(len(ref))
    for group in (np.nonzero(eligible)[0], np.nonzero(~eligible)[0]):
        heap = [(-float(np.maximum(row(int(i)) - covered, 0.0).sum()), int(i)) for i in group]
        heapq.heapify(heap)
        while heap:
            _, i = heapq.heappop(heap)
            best = row(i)
            fresh = float(np.maximum(best - covered, 0.0).sum())
            if heap and (-fresh, i) > heap[0]:  # another's bound beats it: put it back with its fresh gain
                heapq.heappush(heap, (-fresh, i))
                continue
            order.append(i)
            covered = np.maximum(covered, best)
    return np.array(order, dtype=np.int64)
