"""SecFPP's clustering on the device: the client's domain descriptor, its nearest public centroid,
and the K-slot upload that carries everything in the client's own slot only.

The descriptor is a public random projection (seeded by the run's seed, so every client and the
server could draw the same matrix) of the client's domain-prompt update in its first round, which
every client starts from the same shared initialisation, normalised to unit length: clients whose
images need the same change of the prompt point the same way. It is computed once and kept on the
device (one value per client, so the clustering converges like K-means on fixed points).

Secure aggregation sums the uploads slot by slot: the server gets per slot the number of clients,
the sum of their descriptors and of their squared norms, and the sum of their domain prompts, and
never learns which slot a client chose (`aggregator.strategies.adaptive_kmeans`); no second
moment per direction, which would expose the descriptors of a slot with few clients.
"""

from __future__ import annotations

import numpy as np

PROJECTION_SEED = 0x5EC
"""Mixed with the run's seed: the projection is public, but not the shuffling order of training."""


def projection(seed: int, dim: int, size: int) -> np.ndarray:
    """The public [dim, size] Gaussian projection (entries N(0, 1/dim)) of a run."""
    rng = np.random.default_rng([PROJECTION_SEED, seed])
    return rng.standard_normal((dim, size)) / np.sqrt(dim)


def descriptor(update: np.ndarray, seed: int, dim: int) -> np.ndarray:
    """The unit-length projection of a flattened domain-prompt update (zero if the update is)."""
    flat = np.asarray(update, np.float64).ravel()
    projected = projection(seed, dim, flat.size) @ flat
    norm = float(np.linalg.norm(projected))
    return projected / norm if norm > 0 else projected


def nearest(point: np.ndarray, centroids: np.ndarray) -> int:
    """Index of the nearest centroid (the smaller index on a tie)."""
    return int(np.argmin(np.sum((centroids - point) ** 2, axis=1)))


def slot_upload(slot: int, slots: int, domain: np.ndarray, point: np.ndarray) -> dict[str, np.ndarray]:
    """`domain`, a count of 1, `point` and `|point|^2` in slot `slot` of `slots`, zero elsewhere."""
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} outside 0..{slots - 1}")
    upload = {
        "domain": np.zeros((slots, *domain.shape), np.float32),
        "member": np.zeros(slots, np.float32),
        "descriptor": np.zeros((slots, point.size), np.float32),
        "spread": np.zeros(slots, np.float32),
    }
    upload["domain"][slot] = domain
    upload["member"][slot] = 1.0
    upload["descriptor"][slot] = point
    upload["spread"][slot] = float(point @ point)
    return upload
