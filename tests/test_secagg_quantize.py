"""Quantisation to integers modulo 2**bits: the documented error bound holds and is not vacuous, a
full house of clients at the bound does not wrap, and stochastic rounding is unbiased."""

from __future__ import annotations

import numpy as np
import pytest

from fedprompt.common.secagg.quantize import Quantizer


def _clipped_sum_and_decoded(quantizer: Quantizer, inputs: np.ndarray, rng: np.random.Generator | None):
    field_sum = sum(quantizer.encode(x, rng) for x in inputs) % (1 << quantizer.modulus_bits)
    expected = np.clip(inputs, -quantizer.bound, quantizer.bound).sum(axis=0)
    return expected, quantizer.decode(field_sum, len(inputs))


@pytest.mark.parametrize("stochastic", [False, True])
def test_decoded_sum_is_within_the_error_bound_and_the_bound_is_tight(stochastic: bool) -> None:
    quantizer = Quantizer(bound=0.5, max_clients=100, modulus_bits=20)
    data = np.random.default_rng(1)
    inputs = data.normal(0.0, 0.3, size=(10, 4096))  # some coordinates beyond the bound: clipped
    expected, decoded = _clipped_sum_and_decoded(quantizer, inputs, data if stochastic else None)
    error = np.abs(decoded - expected).max()
    bound = quantizer.error_bound(10, stochastic)
    assert error <= bound
    assert error >= 0.3 * bound  # the bound describes the real error, it is not a loose guess


def test_a_full_house_of_clients_at_the_bounds_does_not_wrap() -> None:
    quantizer = Quantizer(bound=2.0, max_clients=7, modulus_bits=16)
    for value in (-5.0, -2.0, 2.0, 5.0):
        inputs = np.full((7, 3), value)
        expected, decoded = _clipped_sum_and_decoded(quantizer, inputs, None)
        np.testing.assert_allclose(decoded, expected, atol=quantizer.error_bound(7, False))
        assert abs(decoded[0]) == pytest.approx(14.0, abs=quantizer.error_bound(7, False))


def test_stochastic_rounding_is_unbiased() -> None:
    quantizer = Quantizer(bound=1.0, max_clients=255, modulus_bits=8)  # one level per client: step 2
    x = np.linspace(-0.9, 0.9, 7)
    rng = np.random.default_rng(2)
    draws = np.stack([quantizer.decode(quantizer.encode(x, rng), 1) for _ in range(4000)])
    standard_error = quantizer.step / 2 / np.sqrt(len(draws))
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - x), 5 * standard_error)
    assert set(np.unique(draws)) == {-1.0, 1.0}  # each single draw is far off: only the mean is right


def test_rejects_non_finite_input_and_sums_beyond_max_clients() -> None:
    quantizer = Quantizer(bound=1.0, max_clients=4)
    with pytest.raises(ValueError, match="NaN"):
        quantizer.encode(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="max_clients"):
        quantizer.decode(np.zeros(2, dtype=np.uint64), 5)
