"""The shared initialisation of a prompt context, in numpy so that the aggregator (no torch) and
the devices draw the same values: CoOp's N(0, std^2), from the run's seed."""

from __future__ import annotations

import numpy as np


def initial_context(n_ctx: int, width: int, std: float, seed: int) -> np.ndarray:
    """[n_ctx, width] float32, the same for every caller with the same arguments."""
    return (np.random.default_rng(seed).standard_normal((n_ctx, width)) * std).astype(np.float32)
