"""The Skellam RDP accountant against an independent computation: the exact Renyi divergence of
shifted Skellam distributions summed from scipy's pmf, and dp-accounting's Gaussian RDP."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from fedprompt.common.distributed_dp import SkellamConfig, default_scale
from fedprompt.common.privacy_labels import describe_epsilon
from fedprompt.common.skellam_accounting import (
    ORDERS,
    gaussian_epsilon,
    matched_to_local,
    noise_multiplier_for,
    replace_one_sensitivity,
    round_release,
    skellam_epsilon,
    skellam_rdp,
)


def exact_skellam_rdp(order: int, shift: np.ndarray, variance: float) -> float:
    """D_order(Sk + shift || Sk) for independent coordinates, each Sk(variance/2, variance/2),
    summed numerically over a support wide enough that the rest is negligible."""
    total = 0.0
    values, counts = np.unique(np.abs(shift), return_counts=True)
    for x, count in zip(values, counts, strict=True):
        reach = int(2 * order * x + 30 * math.sqrt(variance))
        k = np.arange(-reach, reach + 1)
        log_p = stats.skellam.logpmf(k, variance / 2, variance / 2)
        log_q = stats.skellam.logpmf(k - x, variance / 2, variance / 2)
        with np.errstate(invalid="ignore"):
            terms = order * log_q + (1 - order) * log_p
        finite = np.isfinite(log_p) & np.isfinite(log_q)  # scipy underflows to -inf far out
        peak = int(np.argmax(np.where(finite, terms, -np.inf)))
        assert finite[peak - k.size // 4 : peak + k.size // 4].all()  # the mass sits well inside
        total += count * float(logsumexp(terms[finite])) / (order - 1)
    return total


@pytest.mark.parametrize("variance", [40.0, 2000.0])
@pytest.mark.parametrize("shift", [[1], [3], [2, 2, 1], [1] * 12])
def test_bound_is_never_below_the_exact_divergence(variance: float, shift: list[int]) -> None:
    x = np.array(shift)
    l1, l2_sq = float(np.abs(x).sum()), float(x @ x)
    for order in (2, 3, 5, 10, 20, 40):
        exact = exact_skellam_rdp(order, x, variance)
        assert exact <= skellam_rdp(order, l1, l2_sq, variance) * (1 + 1e-9)


def test_bound_is_tight_at_large_variance() -> None:
    """Where the noise is large against the sensitivity the bound is within 2% of the truth."""
    x = np.array([3, 2])
    for order in (2, 4, 8, 16):
        exact = exact_skellam_rdp(order, x, 5000.0)
        assert skellam_rdp(order, 5.0, 13.0, 5000.0) <= 1.02 * exact


def test_gaussian_yardstick_matches_dp_accounting() -> None:
    """The comparison Gaussian uses dp-accounting's RDP and conversion (same orders)."""
    l2_sq, variance, rounds, delta = 4.0, 9.0, 30, 1e-5
    accountant = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    accountant.compose(dp_accounting.GaussianDpEvent(math.sqrt(variance / l2_sq)), rounds)
    assert gaussian_epsilon(l2_sq, variance, rounds, delta) == pytest.approx(
        accountant.get_epsilon(delta), rel=1e-6
    )


def prompt_config(noise_multiplier: float, threshold: int = 12) -> SkellamConfig:
    """PromptFL-sized: 16 context tokens x 512, clip 0.5, 16 devices per round."""
    dim, clip = 16 * 512, 0.5
    return SkellamConfig(
        clip=clip,
        noise_multiplier=noise_multiplier,
        threshold=threshold,
        max_clients=16,
        dim=dim,
        scale=default_scale(clip, dim),
    )


def test_skellam_is_close_to_the_gaussian_at_the_same_variance() -> None:
    """At PromptFL's size the discreteness costs under 2% of epsilon over the Gaussian mechanism
    with the same variance and the (rounding-inflated) sensitivity, and at most 3% over the
    Gaussian on the unrounded clip 2C."""
    config = prompt_config(1.0)
    l1, l2_sq, variance, rounds = round_release(config, 50)
    skellam = skellam_epsilon([(l1, l2_sq, variance, rounds)], 1e-5)
    same_sensitivity = gaussian_epsilon(l2_sq, variance, rounds, 1e-5)
    unrounded = gaussian_epsilon((2 * config.clip * config.scale) ** 2, variance, rounds, 1e-5)
    assert same_sensitivity <= skellam <= 1.02 * same_sensitivity
    assert skellam <= 1.03 * unrounded


def test_worst_case_is_the_threshold_and_rounds_compose() -> None:
    config = prompt_config(1.0, threshold=12)
    release = round_release(config)
    assert release[2] == config.central_variance(12)
    at_threshold = skellam_epsilon([round_release(config, 40)], 1e-5)
    at_all = skellam_epsilon([(*release[:2], float(config.central_variance(16)), 40)], 1e-5)
    assert at_all < at_threshold
    split = skellam_epsilon([round_release(config, 15), round_release(config, 25)], 1e-5)
    assert split == pytest.approx(at_threshold, rel=1e-12)
    assert skellam_epsilon([round_release(config, 10)], 1e-5) < at_threshold
    assert skellam_epsilon([], 1e-5) == 0.0


def test_replace_one_sensitivities() -> None:
    config = prompt_config(1.0)
    l1, l2_sq = replace_one_sensitivity(config)
    assert l2_sq == 4 * config.l2_bound_sq
    assert l1 == pytest.approx(min(2 * config.l1_bound, l2_sq))


def test_calibration_finds_the_smallest_noise_for_an_epsilon() -> None:
    sigma = noise_multiplier_for(3.0, 1e-5, 50, prompt_config)
    spent = skellam_epsilon([round_release(prompt_config(sigma), 50)], 1e-5)
    assert spent <= 3.0 < skellam_epsilon([round_release(prompt_config(sigma / 1.002), 50)], 1e-5)


def test_the_epsilon_is_labelled_with_its_adjacency_and_accountant() -> None:
    line = describe_epsilon(2.5, 1e-5, "distributed", "skellam")
    assert "secure-aggregation threshold" in line and "Skellam RDP" in line


def test_matched_to_local_keeps_each_devices_noise_and_divides_epsilon() -> None:
    """At the demo's setting (clip 0.2, 64 values, 16 devices, 15 rounds, sigma 1.5) each device
    adds the local run's variance, and the epsilon against the aggregator is over 4 times lower
    with the noise sized for all 16, and still lower than local with a threshold of 8."""
    local = gaussian_epsilon(4 * 0.2**2, (1.5 * 0.2) ** 2, 15, 1e-5)
    for threshold, factor in ((16, 4.0), (8, 1.0)):
        config = matched_to_local(0.2, 64, 16, 15, 1.5, threshold)
        device_variance = config.central_variance(1) / config.scale**2
        assert device_variance == pytest.approx((1.5 * 0.2) ** 2, rel=1e-3)
        assert skellam_epsilon([round_release(config, 15)], 1e-5) * factor < local
