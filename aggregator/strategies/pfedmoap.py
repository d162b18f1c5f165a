"""pFedMoAP's server half: the global prompt is the combined (FedAvg by default) mean of the
clients' new local prompts, and a pool keeps each client's latest prompt; each client is sent the
global prompt and, as `experts` [E, n_ctx, W], the K-1 pool prompts nearest to its own
(`aggregator.strategies.expert_pool`). The pool is part of the strategy state, so it is committed
with every round and survives a restart. Gating networks stay on the devices: only prompts arrive.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from aggregator.strategies import register
from aggregator.strategies.base import ClientUpdate, ServerStrategy
from aggregator.strategies.combine import UpdateCombiner
from aggregator.strategies.expert_pool import PromptPool
from aggregator.validation import Interval
from fedprompt.common.methods import RunSettings

POOL_KEY = "prompt_pool"


@register
class PFedMoAPStrategy(ServerStrategy):
    name = "pfedmoap"
    extra_metrics: ClassVar[dict[str, Interval]] = {
        "experts": Interval()
    }  # how many pool prompts the client mixed in

    def __init__(self, settings: RunSettings, combiner: UpdateCombiner | None = None) -> None:
        super().__init__(settings, combiner)
        self.non_local = settings.client.experts - 1
        self.pool = PromptPool()

    def tensors_for_client(self, state: dict[str, np.ndarray], client_id: str) -> dict[str, np.ndarray]:
        experts = self.pool.experts_for(client_id, self.non_local)
        return state if experts is None else {**state, "experts": experts}

    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        new_state, metrics = self.combiner.combine(self.update_reference(state), updates)
        for update in updates:
            self.pool.put(update.client_id, update.tensors["ctx"])
        metrics["pool_size"] = float(len(self.pool))
        for name, tensor in new_state.items():
            metrics[f"{name}_change_l2"] = (
                float(np.linalg.norm(tensor - state[name])) if name in state else 0.0
            )
        return new_state, metrics

    def state_dict(self) -> dict[str, Any]:
        return {POOL_KEY: self.pool.to_json()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool = PromptPool.from_json(state[POOL_KEY]) if POOL_KEY in state else PromptPool()
