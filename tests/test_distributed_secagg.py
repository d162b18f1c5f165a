"""Distributed Skellam DP through the real SecAgg masking (loopback transport, bytes parsed at
every hop): the recovered sum is the survivors' clipped sum plus noise of the configured
variance; one dropout past the threshold recovers nothing."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedprompt.common.distributed_dp import (
    DistributedConfigError,
    SkellamConfig,
    decode_sum,
    from_ring,
    masked_input,
    privatize,
)
from fedprompt.common.secagg import SecAggConfig
from fedprompt.common.secagg.errors import TooManyDropoutsError
from fedprompt.common.secagg.loopback import DropStage, run_loopback

DEVICES, THRESHOLD, DIM = 7, 4, 256


def dp_config() -> SkellamConfig:
    return SkellamConfig(
        clip=1.0, noise_multiplier=0.5, threshold=THRESHOLD, max_clients=DEVICES, dim=DIM, scale=256.0
    )


def test_recovered_sum_is_the_clipped_sum_plus_noise_of_the_configured_variance() -> None:
    """Five sessions, two of seven devices dropping before their masked input each time (the most
    threshold 4 tolerates: every signer needs 4 other uploaders, so a recovered sum holds >= 5
    inputs, one more than the noise is sized for): the modular sum is exactly the survivors' DP
    vectors' sum, and its difference from their scaled clipped sum has the variance of Sk(5 lam)
    plus the rounding's (at most 1/4 per device and coordinate)."""
    config = dp_config()
    secagg = SecAggConfig(vector_length=DIM, threshold=THRESHOLD, modulus_bits=config.modulus_bits)
    config.check_session(secagg.threshold, secagg.modulus_bits, secagg.vector_length)
    rng = np.random.default_rng(0)
    residuals = []
    for session in range(5):
        updates = {i: rng.normal(scale=0.2, size=DIM) for i in range(DEVICES)}
        integers = {
            i: privatize(u, config, config.sampler(random.Random(100 * session + i)), rng)
            for i, u in updates.items()
        }
        inputs = {
            i: v.astype(np.uint64) & np.uint64((1 << config.modulus_bits) - 1) for i, v in integers.items()
        }
        dropped = {
            (session + 1) % DEVICES: DropStage.BEFORE_UPLOAD,
            (session + 3) % DEVICES: DropStage.BEFORE_SHARING,
        }
        run = run_loopback(secagg, inputs, session.to_bytes(16, "big"), dropped)
        survivors = run.result.survivors
        assert len(survivors) == THRESHOLD + 1 and not set(survivors) & set(dropped)
        assert np.array_equal(
            from_ring(run.result.field_sum, config.modulus_bits), sum(integers[i] for i in survivors)
        )
        clipped = sum(updates[i] * min(1.0, config.clip / np.linalg.norm(updates[i])) for i in survivors)
        residuals.append(decode_sum(run.result.field_sum, config) * config.scale - clipped * config.scale)
    residuals = np.concatenate(residuals)
    assert config.central_variance(THRESHOLD) >= (config.noise_multiplier * config.clip * config.scale) ** 2
    variance = config.central_variance(THRESHOLD + 1)
    rounding = (THRESHOLD + 1) * 0.25
    standard_error = variance * math.sqrt(2 / residuals.size)
    assert variance - 5 * standard_error < residuals.var() < variance + rounding + 5 * standard_error
    assert abs(residuals.mean()) < 5 * math.sqrt((variance + rounding) / residuals.size)


@pytest.mark.parametrize("stage", [DropStage.BEFORE_SHARING, DropStage.BEFORE_UPLOAD])
def test_one_dropout_past_the_threshold_recovers_nothing(stage: DropStage) -> None:
    config = dp_config()
    secagg = SecAggConfig(vector_length=DIM, threshold=THRESHOLD, modulus_bits=config.modulus_bits)
    rng = np.random.default_rng(1)
    inputs = {
        i: masked_input(rng.normal(size=DIM), config, config.sampler(random.Random(i)), rng)
        for i in range(DEVICES)
    }
    with pytest.raises(TooManyDropoutsError, match=f"threshold {THRESHOLD}"):
        run_loopback(secagg, inputs, bytes(16), dict.fromkeys((0, 2, 5), stage))


def test_a_session_that_could_sum_fewer_devices_than_the_noise_is_sized_for_is_refused() -> None:
    config = dp_config()
    with pytest.raises(DistributedConfigError, match="below the 4 survivors"):
        config.check_session(THRESHOLD - 1, config.modulus_bits, DIM)
    with pytest.raises(DistributedConfigError, match="modulo"):
        config.check_session(THRESHOLD, 40, DIM)
