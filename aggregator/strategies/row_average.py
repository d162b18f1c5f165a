"""AFSPL's server side of the top-K upload: each prompt row moves by the example-weighted mean of
the updates of the clients that sent that row; rows no client sent stay as they are."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_rows(
    current: np.ndarray, uploads: Sequence[tuple[np.ndarray, np.ndarray, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """(new prompt [P,d], senders per row [P]) from uploads of (indices [K], row updates [K,d], weight)."""
    total = np.zeros(current.shape, dtype=np.float64)
    weight = np.zeros(len(current), dtype=np.float64)
    senders = np.zeros(len(current), dtype=np.int64)
    for indices, rows, examples in uploads:
        if len(set(indices.tolist())) != len(indices) or (
            len(indices) and not 0 <= indices.min() <= indices.max() < len(current)
        ):
            raise ValueError("row indices must be distinct and inside the prompt")
        total[indices] += examples * rows.astype(np.float64)
        weight[indices] += examples
        senders[indices] += 1
    moved = weight > 0
    new = current.astype(np.float64).copy()
    new[moved] += total[moved] / weight[moved, None]
    return new.astype(current.dtype), senders
