"""SecFPP's clustering on the server, from per-slot sums and counts alone (what secure
aggregation gives), with no second moment that would expose a few members' descriptors.

Every client puts its descriptor z (a unit d-vector, `edge_client.methods.domain_clusters`) in the
slot of the public centroid nearest to it, with a 1 in that slot's count and |z|^2 in its spread,
so the round's secure sum gives per slot k: the count n_k, S_k = sum z and Q_k = sum |z|^2, hence
the centroid c_k = S_k / n_k and the within-cluster scatter W_k = Q_k - |S_k|^2 / n_k, nothing per
direction. (Outer-product sums, which this replaces, gave both descriptors of a two-client slot
and all three of a three-client slot; S_k of two unit vectors leaves a (d-2)-sphere of pairs.)

One round is one step of K-means (Lloyd) over the slots with at least `min_size` clients; the
others are not released: their clients' sums are held back, and they join the nearest released
centroid next round. K adapts by bisection checked on the next round's sums: the cluster with the
largest W_k (of at least 2 * min_size clients) is split into c_k +- sqrt(W_k / n_k) u along a
public pseudo-random direction u orthogonal to c_k, when W_k is at least `split_gain` of the total
scatter T of all descriptors; the next round's Lloyd step moves the two halves, and their sums
then give the split's between-halves scatter n_a n_b / (n_a + n_b) |c_a - c_b|^2. The split is
kept if that is at least `split_gain` of T and both halves have `min_size` clients; otherwise the
halves are merged back and K stops growing. For two separated groups any hyperplane through the
centroid that is not orthogonal to their separation divides them; a single round blob split in
d dimensions explains about 2 / (pi d) of its scatter, so it is merged back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRESENT = 0.5
"""A slot whose (exact up to quantisation) count is below this is empty."""
_SPLIT_SEED = 0x5B1
"""The public directions of proposed splits."""


@dataclass(frozen=True)
class SlotSums:
    """Per slot: count [S], sum of descriptors [S, d], sum of their squared norms [S]."""

    counts: np.ndarray
    sums: np.ndarray
    spreads: np.ndarray


@dataclass
class Bisection:
    """What the clustering carries from one round to the next (server-side, persisted)."""

    pending: tuple[int, int] | None = None  # the two halves of last round's split, by slot
    settled: bool = False  # a split was merged back: K grows no more
    proposals: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"pending": list(self.pending or ()), "settled": self.settled, "proposals": self.proposals}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Bisection:
        pending = data.get("pending") or ()
        return cls(
            tuple(pending) if pending else None, bool(data.get("settled")), int(data.get("proposals", 0))
        )


@dataclass(frozen=True)
class ClusterStep:
    """The next centroids [K', d] (none when no slot could be released), for each the slots whose
    sums it averages (a split's two halves share their parent's), and the round's figures."""

    centroids: np.ndarray
    sources: list[list[int]]
    metrics: dict[str, float]
    bisection: Bisection = field(default_factory=Bisection)


def _group(sums: SlotSums, slots: list[int]) -> tuple[float, np.ndarray, float]:
    """(count, centroid, within scatter) of the clients of `slots` together."""
    n = float(sum(max(round(float(sums.counts[k])), 1) for k in slots))
    total = sums.sums[slots].sum(axis=0)
    within = float(sums.spreads[slots].sum() - total @ total / n)
    return n, total / n, max(within, 0.0)


def cluster_step(
    sums: SlotSums, slots: int, split_gain: float, min_size: int, bisection: Bisection
) -> ClusterStep:
    """Check last round's split, one Lloyd step over the released slots, then at most one split."""
    present = [k for k, n in enumerate(sums.counts) if n >= PRESENT]
    released = [k for k in present if round(float(sums.counts[k])) >= min_size]
    held_back = float(sum(round(float(sums.counts[k])) for k in present if k not in released))
    state = Bisection(None, bisection.settled, bisection.proposals)
    if not released:
        return ClusterStep(np.zeros((0, sums.sums.shape[1])), [], {"held_back": held_back}, state)
    n_all, _, total = _group(sums, released)
    groups = [[k] for k in released]
    split_share = None
    if bisection.pending is not None:
        a, b = bisection.pending
        if a in released and b in released:
            (na, ca, _), (nb, cb, _) = _group(sums, [a]), _group(sums, [b])
            split_share = na * nb / (na + nb) * float((ca - cb) @ (ca - cb)) / total if total > 0 else 0.0
        if split_share is None or split_share < split_gain:
            joined = [k for k in (a, b) if k in present]
            groups = [g for g in groups if g[0] not in joined]
            if sum(round(float(sums.counts[k])) for k in joined) >= min_size:
                groups.append(sorted(joined))
            state.settled = True
    figures = [_group(sums, g) for g in groups]
    centroids = np.stack([c for _, c, _ in figures])
    within = sum(w for _, _, w in figures)
    sources = [list(g) for g in groups]
    best = int(np.argmax([w if n >= 2 * min_size else -1.0 for n, _, w in figures]))
    n_best, c_best, w_best = figures[best]
    share = w_best / total if total > 0 else 0.0
    if not state.settled and len(groups) < slots and n_best >= 2 * min_size and share >= split_gain:
        rng = np.random.default_rng([_SPLIT_SEED, state.proposals])
        direction = rng.standard_normal(c_best.size)
        if c_best @ c_best > 0:
            direction -= (direction @ c_best) / (c_best @ c_best) * c_best
        direction /= np.linalg.norm(direction)
        offset = np.sqrt(w_best / n_best) * direction
        centroids[best] = c_best - offset
        centroids = np.vstack([centroids, c_best + offset])
        sources.append(list(sources[best]))
        state.pending = (best, len(centroids) - 1)
        state.proposals += 1
    metrics = {
        "clusters": float(len(centroids)),
        "clients_clustered": n_all,
        "held_back": held_back,
        "explained_scatter": 1.0 - within / total if total > 0 else 1.0,
        "best_split_share": share,
    }
    if split_share is not None:
        metrics["checked_split_share"] = split_share
    return ClusterStep(centroids, sources, metrics, state)
