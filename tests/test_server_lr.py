"""PromptFL's server learning rate: the global prompt moves `server_lr` of the way to the round's
average, on both the plain and the secure-sum path; 1 is plain FedAvg; round 1 takes the average."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategies.base import ClientUpdate
from aggregator.strategies.promptfl import PromptFLStrategy
from fedprompt.common.methods import RunSettings
from fedprompt.common.secure_round import WeightedSum
from fedprompt.common.settings import SettingsError

RNG = np.random.default_rng(0)
OLD = RNG.normal(size=(4, 8)).astype(np.float32)
UPLOADS = [RNG.normal(size=(4, 8)).astype(np.float32) for _ in range(3)]
EXAMPLES = [10, 30, 60]
AVERAGE = sum(n * u for n, u in zip(EXAMPLES, UPLOADS, strict=True)) / sum(EXAMPLES)


def updates() -> list[ClientUpdate]:
    return [
        ClientUpdate(f"c{i}", {"ctx": u}, n) for i, (u, n) in enumerate(zip(UPLOADS, EXAMPLES, strict=True))
    ]


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.3])
def test_the_global_prompt_moves_server_lr_of_the_way_to_the_weighted_average(rate: float) -> None:
    new, _ = PromptFLStrategy(RunSettings.from_flat("promptfl", {"server_lr": rate})).aggregate(
        {"ctx": OLD}, updates()
    )
    np.testing.assert_allclose(new["ctx"], OLD + rate * (AVERAGE - OLD), rtol=1e-5, atol=1e-6)


def test_the_secure_sum_path_takes_the_same_step() -> None:
    total = WeightedSum(tensors={"ctx": AVERAGE * 5.0}, weight=5.0, count=3)
    new, _ = PromptFLStrategy(RunSettings.from_flat("promptfl", {"server_lr": 0.3})).aggregate_sum(
        {"ctx": OLD}, total
    )
    np.testing.assert_allclose(new["ctx"], OLD + 0.3 * (AVERAGE - OLD), rtol=1e-5, atol=1e-6)


def test_round_one_takes_the_average_whatever_the_rate() -> None:
    new, _ = PromptFLStrategy(RunSettings.from_flat("promptfl", {"server_lr": 0.3})).aggregate({}, updates())
    np.testing.assert_allclose(new["ctx"], AVERAGE, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_a_rate_outside_zero_to_one_is_refused(rate: float) -> None:
    with pytest.raises(SettingsError, match="server_lr"):
        PromptFLStrategy(RunSettings.from_flat("promptfl", {"server_lr": rate})).aggregate(
            {"ctx": OLD}, updates()
        )
