"""FedMVP's server half: FedAvg of the clients' PromptFormer deltas (or the configured robust
rule), each decoded first from its upload (`fedprompt.common.compact_update`: dense, or low-rank
factors), so the rules and `norm_bound` see whole updates, measured from zero. Uncompressed
deltas need only their weighted sum, so FedMVP also runs under secure aggregation; a sum of
low-rank factors is not the factors of a sum, so there the upload must be uncompressed."""

from __future__ import annotations

import numpy as np

from aggregator.strategies import register
from aggregator.strategies.base import ClientUpdate, ServerStrategy
from fedprompt.common.compact_update import decompress
from fedprompt.common.secure_round import WeightedSum


@register
class FedMVPStrategy(ServerStrategy):
    name = "fedmvp"

    def update_reference(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {}  # updates are deltas

    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        shapes = {name: tensor.shape for name, tensor in state.items()}
        dense = [
            ClientUpdate(u.client_id, decompress(u.tensors, shapes), u.num_examples, u.metrics)
            for u in updates
        ]
        mean, metrics = self.combiner.combine({}, dense)
        return _step(state, mean), metrics

    def aggregate_sum(
        self, state: dict[str, np.ndarray], total: WeightedSum
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if set(total.tensors) != set(state):
            raise ValueError('secure aggregation of FedMVP needs compression = "none" (dense deltas)')
        return _step(state, {name: t / total.weight for name, t in total.tensors.items()}), {}


def _step(state: dict[str, np.ndarray], mean: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: (tensor + mean[name]).astype(np.float32) for name, tensor in state.items()}
