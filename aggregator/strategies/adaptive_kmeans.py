"""SecFPP's clustering on the server, from per-cluster sums alone (what secure aggregation gives).

Every client puts its descriptor z (a d-vector, `edge_client.methods.domain_clusters`) in the slot
of the public centroid nearest to it, with a 1 in that slot's count and z z^T in its scatter, so
the round's secure sum gives per slot k: the count n_k, sum z and sum z z^T, hence the centroid c_k
and the covariance C_k = sum z z^T / n_k - c_k c_k^T of the cluster, and nothing per client.

One round is one step of K-means (Lloyd): the new centroids are the slots' means, and an empty slot
is dropped. K adapts by bisection with an elbow rule: the cluster whose split explains most, i.e.
the largest n_k * lambda_1(C_k) (its scatter along its principal axis v_1), is split into
c_k -+ sqrt(lambda_1) v_1 when that share of the total scatter T of all descriptors around their
mean is at least `split_gain` and fewer than `slots` clusters exist. For a cluster made of two
separated groups, lambda_1 is (half their distance)^2 plus the spread, so the two new centroids
land on the groups; for a single round blob the share is small (about 1/d) and nothing splits.
At most one split per round, so every split is checked by a Lloyd step before the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRESENT = 0.5
"""A slot whose (exact up to quantisation) count is below this is empty."""


@dataclass(frozen=True)
class SlotSums:
    """Per slot: count [S], sum of descriptors [S, d], sum of their outer products [S, d, d]."""

    counts: np.ndarray
    sums: np.ndarray
    scatters: np.ndarray


@dataclass(frozen=True)
class ClusterStep:
    """The next centroids [K', d], for each the slot it comes from (a split's two halves share
    their parent's), and the round's figures."""

    centroids: np.ndarray
    sources: list[int]
    metrics: dict[str, float]


def cluster_step(sums: SlotSums, slots: int, split_gain: float) -> ClusterStep:
    """One Lloyd step over the non-empty slots, then at most one split by the elbow rule."""
    active = [k for k, n in enumerate(sums.counts) if n >= PRESENT]
    if not active:
        raise ValueError("no client is in any cluster")
    counts = np.array([max(round(float(sums.counts[k])), 1) for k in active], np.float64)
    centroids = np.stack([sums.sums[k] / n for k, n in zip(active, counts, strict=True)])
    covariances = [
        _symmetric(sums.scatters[k] / n - np.outer(c, c))
        for k, n, c in zip(active, counts, centroids, strict=True)
    ]
    mean = sums.sums[active].sum(axis=0) / counts.sum()
    total = float(sum(np.trace(sums.scatters[k]) for k in active) - counts.sum() * mean @ mean)
    within = float(sum(n * np.trace(c) for n, c in zip(counts, covariances, strict=True)))
    axes = [np.linalg.eigh(c) for c in covariances]
    gains = [n * values[-1] for n, (values, _) in zip(counts, axes, strict=True)]
    best = int(np.argmax(gains))
    share = gains[best] / total if total > 0 else 0.0
    sources = list(active)
    if share >= split_gain and counts[best] >= 2 and len(active) < slots:
        values, vectors = axes[best]
        offset = np.sqrt(max(values[-1], 0.0)) * vectors[:, -1]
        parent = centroids[best].copy()
        centroids[best] = parent - offset
        centroids = np.vstack([centroids, parent + offset])
        sources.append(active[best])
    metrics = {
        "clusters": float(len(centroids)),
        "clients_clustered": float(counts.sum()),
        "explained_scatter": 1.0 - within / total if total > 0 else 1.0,
        "best_split_share": share,
    }
    return ClusterStep(centroids, sources, metrics)


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2
