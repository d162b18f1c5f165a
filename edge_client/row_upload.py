"""AFSPL's upload: only the K prompt rows whose update is largest (L2 norm per row), with their
indices (K: the spec's `AFSPLClient.rows_sent`). Under DP the caller privatises the WHOLE update
first (clip + Gaussian noise) and selects from the noisy update, so the selection is
post-processing and the indices leak nothing extra."""

from __future__ import annotations

import numpy as np


def top_k_rows(update: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 [K] ascending, rows [K,d]) of the K rows of `update` [P,d] with the largest
    L2 norm; ties go to the lower index."""
    norms = np.linalg.norm(update.astype(np.float64), axis=1)
    chosen = np.sort(np.argsort(-norms, kind="stable")[:k])
    return chosen.astype(np.int64), update[chosen]
