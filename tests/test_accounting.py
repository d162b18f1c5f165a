"""Every mechanism fedprompt offers, accounted by fedprompt's default accountant, recomputed by a
second, independent implementation (Google's dp-accounting PLD) and, for the plain Gaussian, by
the exact formula: fedprompt's epsilon is never below the tight value nor more than 10% above."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from independent_accounting import assert_tight, pld_epsilon
from scipy.optimize import brentq
from scipy.stats import norm

from aggregator.strategies.base import ClientUpdate
from aggregator.strategies.global_dp import GlobalDP
from edge_client.local_privacy import LocalAccountant, round_cost
from fedprompt.common.privacy import PrivacyAccountant
from fedprompt.common.privacy_labels import describe_epsilon
from fedprompt.common.settings import TrainingSettings


def exact_gaussian_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """The exact epsilon of `steps` Gaussian mechanisms of sensitivity 1 (Balle & Wang 2018): their
    composition is one Gaussian with mu = sqrt(steps) / sigma."""
    mu = math.sqrt(steps) / noise_multiplier

    def excess(eps: float) -> float:  # log-space second term: e^eps * cdf(...) overflows otherwise
        tail = math.exp(eps + norm.logcdf(-eps / mu - mu / 2))
        return norm.cdf(-eps / mu + mu / 2) - tail - delta

    return float(brentq(excess, 0.0, 500.0))


def device_epsilon(settings: TrainingSettings, num_examples: int, rounds: int, state: Path) -> float:
    """The epsilon a device's own accountant reports after `rounds` rounds under `settings`."""
    accountant = LocalAccountant(state, settings)
    cost = round_cost(settings, num_examples)
    for _ in range(rounds):
        accountant.spend(cost)
    return accountant.report(cost)["epsilon"]


@pytest.mark.parametrize(("sigma", "rounds"), [(1.5, 15), (1.5, 1), (1.0, 20), (4.0, 10), (10.0, 3)])
def test_client_level_gaussian(sigma: float, rounds: int, tmp_path: Path) -> None:
    settings = TrainingSettings(dp="client", noise_multiplier=sigma, clip=0.2)
    epsilon = device_epsilon(settings, 200, rounds, tmp_path)
    history = [(sigma / 2, 1.0, rounds)]  # replace-one: sensitivity 2C, so multiplier sigma/2
    assert_tight(epsilon, history, settings.delta)
    exact = exact_gaussian_epsilon(sigma / 2, rounds, settings.delta)
    assert exact <= epsilon <= 1.1 * exact
    assert pld_epsilon(history, settings.delta) == pytest.approx(exact, abs=0.01)  # the two references agree


@pytest.mark.parametrize(
    ("sigma", "batch", "examples", "epochs", "rounds"),
    [(1.1, 8, 32, 1, 2), (1.85, 16, 160, 2, 5), (0.9, 32, 1000, 1, 10), (3.0, 4, 200, 1, 20)],
)
def test_dp_sgd_with_poisson_sampling(
    sigma: float, batch: int, examples: int, epochs: int, rounds: int, tmp_path: Path
) -> None:
    settings = TrainingSettings(dp="sample", noise_multiplier=sigma, batch_size=batch, local_epochs=epochs)
    epsilon = device_epsilon(settings, examples, rounds, tmp_path)
    cost = round_cost(settings, examples)
    assert cost.sample_rate < 1
    assert_tight(epsilon, [(sigma, cost.sample_rate, cost.steps * rounds)], settings.delta)


@pytest.mark.parametrize(("sigma", "rounds"), [(2.0, 5), (1.0, 8), (6.0, 15)])
def test_server_global_dp_of_dpfpl(sigma: float, rounds: int) -> None:
    mechanism = GlobalDP(clip=0.5, noise_multiplier=sigma, delta=1e-6, accountant_kind="prv")
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        updates = [
            ClientUpdate(f"c{i}", {"ctx": rng.normal(size=(2, 4)).astype(np.float32)}, 1) for i in range(3)
        ]
        _, metrics = mechanism.noisy_mean({}, updates)
    assert_tight(metrics["global_epsilon"], [(sigma / 2, 1.0, rounds)], 1e-6)


def test_heterogeneous_history_after_settings_changed() -> None:
    history = [(0.75, 1.0, 3), (1.1, 0.05, 200), (2.0, 0.2, 30)]
    assert_tight(PrivacyAccountant(history=history).epsilon(1e-5), history, 1e-5)


def test_the_demos_mechanism_is_tight_and_rdp_stays_available() -> None:
    """The demo: client-level, sigma 1.5, 15 rounds, delta 1e-5: 34.6 tight, 36.7 under RDP."""
    history = [(1.5 / 2, 1.0, 15)]
    tight = PrivacyAccountant(history=history).epsilon(1e-5)
    assert tight == pytest.approx(34.6, abs=0.1)
    assert PrivacyAccountant("rdp", history).epsilon(1e-5) == pytest.approx(36.67, abs=0.01)


def test_printed_epsilons_name_their_adjacency_and_accountant() -> None:
    client = describe_epsilon(34.64, 1e-5, "client", "prv")
    assert client.startswith("epsilon 34.64 at delta 1e-05") and "replace-one" in client and "PRV" in client
    sample = describe_epsilon(4.0, 1e-5, "sample", "rdp")
    assert "add/remove" in sample and "one example" in sample and "RDP" in sample
