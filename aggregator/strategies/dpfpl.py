"""DP-FPL's server half: the global prompt is the mean of the clients' new global prompts, under
global DP when `global_noise_multiplier` > 0 (`aggregator.strategies.global_dp`: each client's
update clipped to `global_clip`, Gaussian noise on the sum, epsilon in the round metrics), else
the aggregator's configured combiner (FedAvg by example count, or a robust rule).

The global state is `{"ctx": [n_ctx, W]}`, zero before round 1 (the spec's): the clients' local
prompts carry the initialisation. The
local prompts never reach the server. See `edge_client.methods.dpfpl` for the client half and
where fedprompt departs from the official code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.config import ConfigError
from aggregator.strategies import register
from aggregator.strategies.base import ClientUpdate, ServerStrategy
from aggregator.strategies.combine import UpdateCombiner
from fedprompt.common.methods import RunSettings

if TYPE_CHECKING:
    from aggregator.strategies.global_dp import GlobalDP


@register
class DPFPLStrategy(ServerStrategy):
    name = "dpfpl"

    def __init__(self, settings: RunSettings, combiner: UpdateCombiner | None = None) -> None:
        super().__init__(settings, combiner)
        self.global_dp: GlobalDP | None = None
        if settings.server.global_noise_multiplier > 0:
            # opacus (and torch under it) is loaded only for global DP: other servers stay light
            from aggregator.strategies.global_dp import GlobalDP

            self.global_dp = GlobalDP.from_settings(settings)
        if self.global_dp is not None and self.combiner != UpdateCombiner():
            raise ConfigError(
                "dpfpl with global DP (dpfpl.server.global_noise_multiplier > 0) averages clipped "
                "updates itself: leave [aggregation] at its defaults"
            )

    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        reference = self.update_reference(state)
        if self.global_dp is None:
            new_state, metrics = self.combiner.combine(reference, updates)
        else:
            new_state, metrics = self.global_dp.noisy_mean(reference, updates)
        for name, tensor in new_state.items():
            metrics[f"{name}_change_l2"] = (
                float(np.linalg.norm(tensor - state[name])) if name in state else 0.0
            )
        return new_state, metrics

    def state_dict(self) -> dict[str, Any]:
        return {} if self.global_dp is None else self.global_dp.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.global_dp is not None:
            self.global_dp.load_state_dict(state)
