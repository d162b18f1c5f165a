"""Who shares keys with whom: the complete graph (SecAgg) or a random k-regular graph (SecAgg+).

SecAgg+ (Bell et al., CCS 2020) replaces the complete graph by a random Harary graph of even degree
k: clients are placed on a ring in a random order and each is joined to the k/2 nearest on either
side. Masks and shares then cost O(k) per client instead of O(n). The order is a public function of
a seed and the set of clients, so the server and every client compute the same graph; the
protocol's seed is `Roster.graph_seed` (the session id and every member's fresh session keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def neighbourhoods(client_ids: Iterable[int], degree: int | None, seed: bytes) -> dict[int, frozenset[int]]:
    """Each client's neighbours; complete when `degree` is None or not below the number of peers."""
    ids = sorted(set(client_ids))
    if degree is None or degree >= len(ids) - 1:
        return {i: frozenset(ids) - {i} for i in ids}
    if degree % 2:
        raise ValueError(f"a SecAgg+ graph needs an even degree, got {degree}")
    digest = hashlib.sha256(b"fedprompt-secagg-v1/graph" + seed + np.asarray(ids, ">u4").tobytes())
    ring = np.random.default_rng(int.from_bytes(digest.digest(), "big")).permutation(ids).tolist()
    offsets = [offset for offset in range(-degree // 2, degree // 2 + 1) if offset]
    return {
        client: frozenset(ring[(position + offset) % len(ring)] for offset in offsets)
        for position, client in enumerate(ring)
    }
