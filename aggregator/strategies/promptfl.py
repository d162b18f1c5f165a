"""PromptFL's server half: FedAvg of the clients' new context vectors, weighted by example count.

The global state is `{"ctx": [n_ctx, width]}`. Before round 1 it is empty, because the server does
not know the text width of the clients' bundle: in round 1 every client initialises `ctx` itself
from the shared settings (`seed`, `ctx_init_std`), and the first average becomes the global prompt.
"""

from __future__ import annotations

import numpy as np

from aggregator.strategies import register
from aggregator.strategies.base import ClientUpdate, ServerStrategy


def weighted_average(updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
    """Per-tensor mean of the updates weighted by their example counts (float64 sum, float32 out)."""
    total = sum(update.num_examples for update in updates)
    names = updates[0].tensors.keys()
    return {
        name: (sum(u.num_examples * u.tensors[name].astype(np.float64) for u in updates) / total).astype(
            np.float32
        )
        for name in names
    }


@register
class PromptFLStrategy(ServerStrategy):
    """FedAvg of `ctx`; the clients send their locally trained ctx (noised first under client DP)."""

    name = "promptfl"

    def initial_state(self) -> dict[str, np.ndarray]:
        return {}

    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        new_state = weighted_average(updates)
        change = {
            f"{name}_change_l2": float(np.linalg.norm(tensor - state[name])) if name in state else 0.0
            for name, tensor in new_state.items()
        }
        return new_state, change
