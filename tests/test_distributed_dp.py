"""The distributed Skellam mechanism: exact sampler, rounding, per-device shares, wrap-around check."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from fedprompt.common import skellam_sampler
from fedprompt.common.distributed_dp import (
    DistributedConfigError,
    SkellamConfig,
    conditional_round,
    decode_sum,
    default_scale,
    privatize,
    to_ring,
)
from fedprompt.common.secagg.modulus import Modulus
from fedprompt.common.skellam_sampler import PoissonSampler, SkellamSampler, block_width


def chi_square_p(samples: np.ndarray, pmf, support: np.ndarray) -> float:
    """Chi-square p-value of integer samples against `pmf` on `support`, tails pooled into the
    end bins and sparse bins merged so every expected count is >= 5."""
    observed = np.array([np.sum(samples == k) for k in support], dtype=float)
    observed[0] += np.sum(samples < support[0])
    observed[-1] += np.sum(samples > support[-1])
    probs = pmf(support)
    expected = probs / probs.sum() * samples.size  # the supports leave < 1e-9 of the mass outside
    obs, exp, o_acc, e_acc = [], [], 0.0, 0.0
    for o, e in zip(observed, expected, strict=True):
        o_acc, e_acc = o_acc + o, e_acc + e
        if e_acc >= 5:
            obs.append(o_acc)
            exp.append(e_acc)
            o_acc = e_acc = 0.0
    obs[-1] += o_acc
    exp[-1] += e_acc
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("lam", [1, 7, 400, 250_000])
def test_poisson_sampler_matches_the_exact_pmf(lam: int) -> None:
    samples = PoissonSampler(lam, random.Random(lam)).samples(20_000)
    width = 8 * math.sqrt(lam) + 10
    support = np.arange(max(0, int(lam - width)), int(lam + width) + 1)
    assert chi_square_p(samples, lambda k: stats.poisson.pmf(k, lam), support) > 1e-3


def test_skellam_sampler_matches_the_exact_pmf_and_is_integer() -> None:
    sampler = SkellamSampler(50, random.Random(3))
    samples = sampler.samples(20_000)
    assert samples.dtype == np.int64 and sampler.variance == 100
    support = np.arange(-80, 81)
    assert chi_square_p(samples, lambda k: stats.skellam.pmf(k, 50, 50), support) > 1e-3


def test_a_sampler_that_ignores_the_pmf_fails_the_chi_square() -> None:
    """The chi-square check has power: Poisson(401) samples fail against Poisson(400)."""
    samples = PoissonSampler(401, random.Random(5)).samples(20_000)
    support = np.arange(300, 501)
    assert chi_square_p(samples, lambda k: stats.poisson.pmf(k, 400), support) < 1e-3


@pytest.mark.parametrize("lam", [1, 2, 9, 1000, 123_457])
def test_block_width_dominates_the_pmf_exactly(lam: int) -> None:
    """p(m +- j) <= p(m) 2**-floor(j/w) (exact fractions), so every acceptance probability is <= 1;
    and w is the smallest width that halves."""
    width = block_width(lam)
    for j in sorted({*range(0, 2 * width + 2, max(1, width // 50)), 3 * width, 10 * width + 1}):
        for k in (lam + j, lam - j):
            if k < 0:
                continue
            num, den = skellam_sampler._ratio_to_mode(lam, lam, k)
            assert Fraction(num, den) <= Fraction(1, 2 ** (j // width))
    assert width == 1 or not skellam_sampler._halves(lam, width - 1)


def test_float_shortcut_stays_far_inside_its_band() -> None:
    """The float estimate of each acceptance probability is within FLOAT_BAND/1000 (relative) of
    the exact fraction, so the shortcut decides exactly as the integer comparison would."""
    for lam in (3, 400, 250_000):
        width = block_width(lam)
        for j in range(-2 * width, 2 * width, max(1, width // 7)):
            k = lam + j
            if k < 0:
                continue
            block = abs(j) // width
            num, den = skellam_sampler._ratio_to_mode(lam, lam, k)
            exact = Fraction(num << block, den)
            log_p = j * math.log(lam) - math.lgamma(k + 1) + math.lgamma(lam + 1) + block * math.log(2.0)
            assert abs(math.log(exact) - log_p) < skellam_sampler.FLOAT_BAND / 1000


def test_noise_comes_from_the_os_by_default() -> None:
    assert isinstance(PoissonSampler(5).source, random.SystemRandom)
    with pytest.raises(ValueError):
        PoissonSampler(2.5)


def small_config(**overrides) -> SkellamConfig:
    settings = dict(clip=1.0, noise_multiplier=1.0, threshold=4, max_clients=6, dim=64, scale=64.0)
    settings.update(overrides)
    return SkellamConfig(**settings)


def test_sum_of_device_shares_has_the_configured_variance() -> None:
    """Threshold-many devices' noise (zero updates, so only noise) sums to variance 2 t lam, at
    least the target (noise_multiplier * clip * scale)**2; more survivors add more."""
    config = small_config(dim=4000)
    source = random.Random(11)
    zeros = np.zeros(config.dim)
    shares = [privatize(zeros, config, config.sampler(source)) for _ in range(config.threshold)]
    total = np.sum(shares, axis=0)
    variance = config.central_variance(config.threshold)
    assert variance >= (config.noise_multiplier * config.clip * config.scale) ** 2
    assert variance == 2 * config.threshold * config.device_lambda
    standard_error = variance * math.sqrt(2 / config.dim)
    assert abs(total.var() - variance) < 5 * standard_error
    assert abs(total.mean()) < 5 * math.sqrt(variance / config.dim)


def test_conditional_rounding_is_unbiased_and_within_the_bound() -> None:
    config = small_config(dim=32)
    rng = np.random.default_rng(0)
    update = rng.normal(size=config.dim)
    scaled = update / np.linalg.norm(update) * config.clip * config.scale
    draws = np.array([conditional_round(scaled, config.l2_bound_sq, rng) for _ in range(4000)])
    assert (np.einsum("ij,ij->i", draws, draws) <= config.l2_bound_sq).all()
    # conditioning on the norm pulls slightly towards the origin (as in the papers): a tenth of a
    # rounding step at most here; without the condition the rounding is unbiased
    assert np.abs(draws.mean(axis=0) - scaled).max() < 0.1
    free = np.array([conditional_round(scaled, 10**9, rng) for _ in range(4000)])
    assert np.abs(free.mean(axis=0) - scaled).max() < 5 * 0.5 / math.sqrt(4000)


def test_modular_sum_decodes_to_the_clipped_sum_plus_the_noise() -> None:
    """Devices' vectors summed in Z_{2**bits} and centre-lifted give the integer sum exactly;
    divided by the scale it is the clipped sum up to rounding (<= 1/scale per device) plus noise."""
    config = small_config()
    rng = np.random.default_rng(1)
    updates = [rng.normal(scale=3.0, size=config.dim) for _ in range(config.max_clients)]
    vectors = [privatize(u, config, config.sampler(random.Random(i)), rng) for i, u in enumerate(updates)]
    modulus = Modulus(config.modulus_bits)
    field_sum = modulus.zeros(config.dim)
    for vector in vectors:
        field_sum = modulus.add(field_sum, to_ring(vector, config.modulus_bits))
    assert np.array_equal(decode_sum(field_sum, config) * config.scale, np.sum(vectors, axis=0))
    clipped_sum = sum(u * min(1.0, config.clip / np.linalg.norm(u)) for u in updates)
    noise = decode_sum(field_sum, config) - clipped_sum
    assert np.abs(noise).max() < 6 * math.sqrt(config.central_variance(config.max_clients)) / config.scale + 1


def test_configuration_refuses_a_likely_wrap_and_prints_its_bound() -> None:
    config = small_config()
    assert config.wrap_probability < 1e-9
    assert f"{config.wrap_probability:.2g}" in config.summary()
    with pytest.raises(DistributedConfigError, match="wrap-around"):
        small_config(modulus_bits=10)


def test_default_scale_keeps_the_rounding_inflation_small() -> None:
    scale = default_scale(clip=0.5, dim=8192)
    config = small_config(clip=0.5, dim=8192, scale=scale)
    assert math.log2(scale) == int(math.log2(scale))
    assert math.sqrt(config.l2_bound_sq) <= 1.01 * 0.5 * scale
    assert math.sqrt(small_config(clip=0.5, dim=8192, scale=scale / 2).l2_bound_sq) > 1.01 * 0.5 * scale / 2
