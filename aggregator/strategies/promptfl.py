"""PromptFL's server half: FedAvg of the clients' new context vectors, weighted by example count
(or the aggregator's configured robust rule, see `aggregator.strategies.combine`). The weighted
mean needs only the weighted sum, so PromptFL also runs under secure aggregation.

The global state is `{"ctx": [n_ctx, width]}`. Before round 1 it is empty, because the server does
not know the text width of the clients' bundle: in round 1 every client initialises `ctx` itself
from the shared settings (`seed`, `ctx_init_std`), and the first average becomes the global prompt.
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
    sums_suffice = True

    def initial_state(self) -> dict[str, np.ndarray]:
        return {}

    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        new_state, metrics = self.combiner.combine(self.update_reference(state), updates)
        return new_state, {**metrics, **_changes(state, new_state)}

    def aggregate_sum(
        self, state: dict[str, np.ndarray], total: WeightedSum
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        new_state = {name: (t / total.weight).astype(np.float32) for name, t in total.tensors.items()}
        return new_state, _changes(state, new_state)


def _changes(state: dict[str, np.ndarray], new_state: dict[str, np.ndarray]) -> dict[str, float]:
    """L2 change of every global tensor (0 for one that is new this round)."""
    return {
        f"{name}_change_l2": float(np.linalg.norm(tensor - state[name])) if name in state else 0.0
        for name, tensor in new_state.items()
    }
