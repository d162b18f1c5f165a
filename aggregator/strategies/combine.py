"""How a round's updates become one set of tensors: the weighted mean, or a robust rule.

One implementation for every server half that averages tensors, so that robustness is a setting
of the aggregator, not of each method. With n updates and f of them malicious:

- "median": coordinate-wise median. While f < n / 2, every coordinate stays inside the range of
  the honest values.
- "trimmed_mean": per coordinate, drop k = floor(trim_fraction * n) values at each end and average
  the rest; while f <= k the result stays inside the range of the honest values.
- `norm_bound`: each update's L2 distance to the reference (the global model) is clipped first,
  so whatever the rule, the result is within `norm_bound` of the reference.

The robust rules are unweighted: a client can claim any example count. Sums run in float64.
Numpy only: the aggregator does not need torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # base imports this module for its default combiner
    from aggregator.strategies.base import ClientUpdate

RULES = ("mean", "median", "trimmed_mean")


def _origin(reference: Mapping[str, np.ndarray], name: str) -> np.ndarray | float:
    """Where a tensor's distance is measured from: the reference, or zero where it has no such
    tensor (e.g. PromptFL's round 1, before any global prompt exists)."""
    return reference.get(name, 0.0)


def distance(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (tensors - reference) over all tensors jointly."""
    return math.sqrt(
        sum(
            float(np.sum(np.square(tensor.astype(np.float64) - _origin(reference, name))))
            for name, tensor in tensors.items()
        )
    )


@dataclass(frozen=True)
class UpdateCombiner:
    """Combines updates under one rule; see the module docstring for what each bounds."""

    rule: str = "mean"
    trim_fraction: float = 0.1
    norm_bound: float = 0.0  # 0 = no clipping

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown aggregation rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")

    def combine(
        self, reference: Mapping[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The combined tensors (float32) and metrics: how many updates were clipped, and the
        largest distance of an update to the reference."""
        if not updates:
            raise ValueError("nothing to combine")
        points = [self._bounded(update.tensors, reference) for update in updates]
        distances = [distance(update.tensors, reference) for update in updates]
        clipped = sum(d > self.norm_bound for d in distances) if self.norm_bound else 0
        metrics = {"max_update_distance": max(distances), "clipped_updates": float(clipped)}
        weights = np.array([update.num_examples for update in updates], dtype=np.float64)
        combined = {
            name: self._per_coordinate(np.stack([point[name] for point in points]), weights).astype(
                np.float32
            )
            for name in points[0]
        }
        return combined, metrics

    def _bounded(
        self, tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The update in float64, moved towards the reference so its distance is <= norm_bound."""
        points = {name: tensor.astype(np.float64) for name, tensor in tensors.items()}
        far = distance(points, reference)
        if not self.norm_bound or far <= self.norm_bound:
            return points
        scale = self.norm_bound / far
        return {
            name: _origin(reference, name) + scale * (point - _origin(reference, name))
            for name, point in points.items()
        }

    def _per_coordinate(self, stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
        if self.rule == "median":
            return np.median(stacked, axis=0)
        if self.rule == "trimmed_mean":
            cut = math.floor(self.trim_fraction * len(stacked))
            return np.sort(stacked, axis=0)[cut : len(stacked) - cut].mean(axis=0)
        return np.tensordot(weights / weights.sum(), stacked, axes=1)
