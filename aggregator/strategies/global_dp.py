"""Global DP at the server: a Gaussian mechanism on the mean of the clients' updates, accounted by
an opacus accountant that is persisted with the strategy state (a restarted daemon continues it).

Per round: each client's update (its upload minus the current global tensors) is clipped to L2
norm C_g, the clipped updates are summed, N(0, (sigma_g * C_g)^2) noise is added to every
coordinate of the sum, and the sum is divided by the number of clients n. Unweighted: weighting by
claimed example counts would let one client carry more than 1/n of the mean and break the bound.

What it protects: the released global tensors, against everyone but the aggregator itself (which
sees the uploads; a device wanting protection from the aggregator too needs local DP). Adjacency:
one client's data replaced by any other, as for fedprompt's client-level local DP, so the sum's L2
sensitivity is 2 * C_g and the accountant is stepped with multiplier sigma_g / 2, once per round.
Dividing by n is then post-processing (n does not depend on any client's data). No amplification
by the server's sampling of clients is claimed (sample rate 1): the coordinator samples a fixed
number of clients with a seeded generator, which is neither Poisson nor secret.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregator.strategies.base import ClientUpdate
from fedprompt.common.methods import RunSettings
from fedprompt.common.privacy import (
    PrivacyAccountant,
    add_gaussian_noise,
    client_level_accounting,
    clip_to_norm,
    secure_rng,
)

STATE_KEY = "global_dp_accountant"


class GlobalDP:
    """The mechanism and its accountant (global_noise_multiplier > 0)."""

    def __init__(self, clip: float, noise_multiplier: float, delta: float, accountant_kind: str) -> None:
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = PrivacyAccountant(kind=accountant_kind)

    @classmethod
    def from_settings(cls, settings: RunSettings) -> GlobalDP:
        server, core = settings.server, settings.core
        return cls(server.global_clip, server.global_noise_multiplier, core.delta, core.accountant)

    def noisy_mean(
        self, reference: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """reference + (sum of clipped updates + noise) / n, in float32; also the round's metrics:
        the epsilon spent so far and every parameter it was computed from."""
        contributions = []
        clipped_count = 0
        for update in updates:
            delta = {
                name: tensor.astype(np.float64) - reference.get(name, 0.0)
                for name, tensor in update.tensors.items()
            }
            clipped, norm = clip_to_norm(delta, self.clip)
            contributions.append(clipped)
            clipped_count += norm > self.clip
        total = {name: sum(c[name] for c in contributions) for name in contributions[0]}
        noised = add_gaussian_noise(total, self.noise_multiplier * self.clip, secure_rng())
        mean = {
            name: (reference.get(name, 0.0) + noised[name] / len(updates)).astype(np.float32)
            for name in noised
        }
        step = client_level_accounting(self.noise_multiplier)
        self.accountant.step(step["noise_multiplier"], step["sample_rate"], step["steps"])
        metrics = {
            "global_epsilon": self.accountant.epsilon(self.delta),
            "global_delta": self.delta,
            "global_clip": self.clip,
            "global_noise_multiplier": self.noise_multiplier,
            "global_accounted_noise_multiplier": step["noise_multiplier"],
            "global_sample_rate": step["sample_rate"],
            "global_rounds": float(self.accountant.steps),
            "global_clipped_updates": float(clipped_count),
        }
        return mean, metrics

    def state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: self.accountant.to_json()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if STATE_KEY in state:
            self.accountant = PrivacyAccountant.from_json(state[STATE_KEY])
