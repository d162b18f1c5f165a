"""PromptFL's server half: FedAvg of the clients' new context vectors, weighted by example count
(or the aggregator's configured robust rule, see `aggregator.strategies.combine`). The weighted
mean needs only the weighted sum, so PromptFL also runs under secure aggregation.

The global state is `{"ctx": [n_ctx, width]}`, before round 1 the shared seeded initialisation
(the spec's, sized from the bundle). Each round the global prompt moves `server_lr` of the way to
the round's average (server learning rate; 1 = plain FedAvg): under client-level DP a step below 1
damps the round-to-round noise while the consistent part of the updates still accumulates.
"""

from __future__ import annotations

import numpy as np

from aggregator.strategies import register
from aggregator.strategies.base import ClientUpdate, ServerStrategy
from fedprompt.common.secure_round import WeightedSum


@register
class PromptFLStrategy(ServerStrategy):
    """FedAvg of `ctx` (or the configured robust rule); the clients send their locally trained ctx
    (noised first under client DP)."""

    name = "promptfl"

    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        average, metrics = self.combiner.combine(self.update_reference(state), updates)
        new_state = self._server_step(state, average)
        return new_state, {**metrics, **_changes(state, new_state)}

    def aggregate_sum(
        self, state: dict[str, np.ndarray], total: WeightedSum
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        average = {name: (t / total.weight).astype(np.float32) for name, t in total.tensors.items()}
        new_state = self._server_step(state, average)
        return new_state, _changes(state, new_state)

    def _server_step(
        self, state: dict[str, np.ndarray], average: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Move each global tensor `server_lr` of the way to the round's average (1: the average)."""
        rate = self.settings.server.server_lr
        if rate == 1:
            return average
        return {
            name: (state[name] + rate * (mean - state[name])).astype(np.float32) if name in state else mean
            for name, mean in average.items()
        }


def _changes(state: dict[str, np.ndarray], new_state: dict[str, np.ndarray]) -> dict[str, float]:
    """L2 change of every global tensor (0 for one that is new this round)."""
    return {
        f"{name}_change_l2": float(np.linalg.norm(tensor - state[name])) if name in state else 0.0
        for name, tensor in new_state.items()
    }
