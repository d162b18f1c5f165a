"""Compact uploads of a model update: low-rank factors with error feedback, in numpy (both halves).

A client uploads its round's update (new - received tensors), not its weights, so that the
aggregator's int8 wire encoding (`update_encoding = "int8"`: one symmetric scale per tensor,
`fedprompt.common.codec`) quantises small differences instead of large weights. On top of that,
`compression = "lowrank"` sends each matrix M [m, n] with min(m, n) > rank as two factors
P [m, r], Q [n, r] of one power-iteration step (as PowerSGD): with the residual e the device kept
from its last round, M' = M + e, P = orth(M' Q0), Q = M'^T P, and M' ~ P Q^T; the device keeps
e = M' - P Q^T for the next round (error feedback: what one round leaves out is sent later) and
Q as the next round's Q0 (warm start). Vectors and small matrices travel whole.

The residual and Q0 are computed from the upload's own inputs (under client-level DP: from the
already privatised update), so keeping them adds no privacy cost. The server decodes each
client's factors to a dense update before averaging, so the robust rules see whole updates; a
sum of factor pairs is not the factors of a sum, so secure aggregation runs uncompressed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

COMPRESSIONS = ("none", "lowrank")
Shapes = dict[str, tuple[int, ...]]
FACTORS = (".p", ".q")


def factorised(shape: tuple[int, ...], rank: int) -> bool:
    return len(shape) == 2 and min(shape) > rank


def upload_shapes(shapes: Mapping[str, tuple[int, ...]], compression: str, rank: int) -> Shapes:
    """Names and shapes of a compressed update of tensors with these shapes."""
    if compression == "none":
        return dict(shapes)
    result: Shapes = {}
    for name, shape in shapes.items():
        if factorised(shape, rank):
            result[name + ".p"], result[name + ".q"] = (shape[0], rank), (shape[1], rank)
        else:
            result[name] = tuple(shape)
    return result


def _orthonormal(matrix: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(matrix)
    return q


def compress(
    update: Mapping[str, np.ndarray],
    rank: int,
    memory: Mapping[str, np.ndarray],
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(upload, new memory). `memory` holds "<name>.error" and "<name>.basis" per factorised
    matrix from the last round ({} at first: zero residual, a random Q0)."""
    upload: dict[str, np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}
    for name, tensor in update.items():
        tensor = np.asarray(tensor, np.float64)
        if not factorised(tensor.shape, rank):
            upload[name] = tensor.astype(np.float32)
            continue
        target = tensor + memory.get(name + ".error", 0.0)
        basis = memory.get(name + ".basis")
        if basis is None or basis.shape != (tensor.shape[1], rank):
            basis = rng.standard_normal((tensor.shape[1], rank))
        p = _orthonormal(target @ basis)
        q = target.T @ p
        upload[name + ".p"], upload[name + ".q"] = p.astype(np.float32), q.astype(np.float32)
        kept[name + ".error"] = (
            target - upload[name + ".p"].astype(np.float64) @ upload[name + ".q"].T
        ).astype(np.float32)
        kept[name + ".basis"] = upload[name + ".q"]
    return upload, kept


def decompress(
    upload: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """The dense update [shapes] an upload stands for (the identity for uncompressed ones)."""
    dense: dict[str, np.ndarray] = {}
    for name in shapes:
        if name in upload:
            dense[name] = np.asarray(upload[name], np.float32)
        else:
            p, q = (np.asarray(upload[name + suffix], np.float64) for suffix in FACTORS)
            dense[name] = (p @ q.T).astype(np.float32)
    return dense
