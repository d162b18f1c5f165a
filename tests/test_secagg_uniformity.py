"""What the server sees of one client, its masked upload, is statistically indistinguishable from
uniform noise modulo 2**bits, while the same test plainly rejects the unmasked quantised input and
a broken masker that only covers the low 16 bits. Statistics are numpy-only and checked against
published table values; runs are seeded, so the verdicts are reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
from secagg_session import until_masking, wire

from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.quantize import Quantizer

SIGNIFICANCE = 1e-3
CONFIG = SecAggConfig(vector_length=8192, threshold=3, modulus_bits=32)
N_CLIENTS = 5


def chi_square_p_value(statistic: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty normal approximation, dof >= 100)."""
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def bytes_uniformity_p_value(values: np.ndarray) -> float:
    """Chi-square test that every byte position of the 32-bit values is uniform over 0..255."""
    octets = values.astype("<u4").view(np.uint8).reshape(-1, 4)
    counts = np.stack([np.bincount(octets[:, position], minlength=256) for position in range(4)])
    expected = len(octets) / 256
    return chi_square_p_value(float(((counts - expected) ** 2 / expected).sum()), 4 * 255)


def kolmogorov_tail(lam: float) -> float:
    """P(sqrt(n) * D > lam) for the Kolmogorov distribution (large n)."""
    return min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101)))


def ks_uniform_p_value(values: np.ndarray) -> float:
    """Kolmogorov-Smirnov test of values / 2**32 against U(0, 1)."""
    u = np.sort(values.astype(np.float64) / 2.0**32)
    n = len(u)
    d = max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max())
    return kolmogorov_tail((math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d)


def test_the_statistics_match_published_critical_values() -> None:
    assert chi_square_p_value(1168.497, 1023) == pytest.approx(1e-3, rel=0.05)  # chi2 0.999 quantile
    assert chi_square_p_value(1022.333, 1023) == pytest.approx(0.5, abs=0.01)  # its median
    assert kolmogorov_tail(1.9495) == pytest.approx(1e-3, rel=0.01)  # KS critical values
    assert kolmogorov_tail(1.3581) == pytest.approx(0.05, rel=0.01)


@pytest.fixture(scope="module")
def server_view() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(quantised inputs, masked uploads as the server parses them) for one seeded session."""
    rng = np.random.default_rng(4)
    quantizer = Quantizer(bound=1.0, max_clients=N_CLIENTS, modulus_bits=CONFIG.modulus_bits)
    inputs = {i: quantizer.encode(rng.normal(0.0, 0.05, CONFIG.vector_length), rng) for i in range(N_CLIENTS)}
    clients, _, deliveries = until_masking(CONFIG, inputs)
    return inputs, {i: wire(clients[i].mask(deliveries[i], inputs[i])).values() for i in inputs}


def test_each_masked_upload_looks_uniform(server_view) -> None:
    _, uploads = server_view
    for upload in uploads.values():
        assert bytes_uniformity_p_value(upload) > SIGNIFICANCE
        assert ks_uniform_p_value(upload) > SIGNIFICANCE


def test_the_same_tests_reject_unmasked_and_badly_masked_inputs(server_view) -> None:
    inputs, _ = server_view
    weak_masks = np.random.default_rng(5).integers(0, 1 << 16, CONFIG.vector_length, dtype=np.uint64)
    for i, quantised in inputs.items():
        assert bytes_uniformity_p_value(quantised) < 1e-12, i
        assert ks_uniform_p_value(quantised) < 1e-12, i
        low_bits_only = (quantised + weak_masks) % (1 << 32)
        assert bytes_uniformity_p_value(low_bits_only) < 1e-12, i
