"""Noise calibration: the noise multiplier at which a run spends a target epsilon.

The epsilon of a candidate noise multiplier is what the device's own accountant will report after
the run: the round's mechanism comes from `edge_client.local_privacy.round_cost` (the one place
that turns settings into (multiplier, sampling rate, steps)), and opacus' accountant (through
`fedprompt.common.privacy.PrivacyAccountant`) composes it over the rounds. So two methods
calibrated to the same target are compared at the epsilon their devices really report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from edge_client.local_privacy import round_cost
from fedprompt.common.privacy import PrivacyAccountant
from fedprompt.common.settings import TrainingSettings

SEARCH_LIMIT = 1e4  # no sensible experiment needs a noise multiplier beyond this


def epsilon_after_rounds(settings: TrainingSettings, num_examples: int, rounds: int) -> float:
    """Epsilon a client with `num_examples` local examples has spent after taking part in `rounds`
    rounds under `settings`, as its accountant computes it."""
    cost = round_cost(settings, num_examples)
    if cost is None:
        raise ValueError("settings have dp = none: no epsilon to calibrate")
    accountant = PrivacyAccountant(kind=settings.accountant)
    return accountant.epsilon_after(
        settings.delta, cost.noise_multiplier, cost.sample_rate, cost.steps * rounds
    )


def calibrate_noise_multiplier(
    settings: TrainingSettings,
    examples_per_client: Sequence[int],
    rounds: int,
    target_epsilon: float,
    relative_tolerance: float = 1e-3,
) -> float:
    """The smallest noise multiplier (within `relative_tolerance`) with which every client spends at
    most `target_epsilon` after taking part in all `rounds` rounds; found by bisection on a log
    scale, epsilon falling as the multiplier grows."""
    sizes = sorted(set(examples_per_client))

    def worst_epsilon(noise_multiplier: float) -> float:
        candidate = replace(settings, noise_multiplier=noise_multiplier)
        return max(epsilon_after_rounds(candidate, n, rounds) for n in sizes)

    high = 1.0
    while worst_epsilon(high) > target_epsilon:
        high *= 2
        if high > SEARCH_LIMIT:
            raise ValueError(f"no noise multiplier up to {SEARCH_LIMIT:g} reaches epsilon {target_epsilon:g}")
    low = high / 2
    while worst_epsilon(low) <= target_epsilon:
        low /= 2
        if low < 1e-4:
            raise ValueError(f"epsilon {target_epsilon:g} is reached with almost no noise; lower the target")
    while high / low > 1 + relative_tolerance:
        middle = (high * low) ** 0.5
        if worst_epsilon(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high
