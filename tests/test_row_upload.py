"""AFSPL's top-K row upload and the server's per-row average."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategies.row_average import average_rows
from edge_client.row_upload import top_k_rows
from fedprompt.common.methods.afspl import AFSPLClient
from fedprompt.common.privacy import client_level_mechanism
from fedprompt.common.settings import SettingsError


def test_k_is_thirty_percent_of_sixteen_rows_rounded_up() -> None:
    def k(tokens: int, fraction: float) -> int:
        return AFSPLClient(prompt_tokens=tokens, top_k_fraction=fraction).rows_sent

    assert k(16, 0.3) == 5 and k(16, 1.0) == 16 and k(3, 0.01) == 1
    with pytest.raises(SettingsError):
        k(16, 0.0)


def test_the_rows_with_the_largest_update_are_sent_with_their_indices() -> None:
    update = np.zeros((6, 3), dtype=np.float32)
    update[4] = 3.0
    update[1] = -2.0
    update[5, 0] = 1.0
    indices, rows = top_k_rows(update, 2)
    assert indices.tolist() == [1, 4] and np.array_equal(rows, update[[1, 4]])


def test_under_dp_the_rows_are_chosen_from_the_noisy_update() -> None:
    rng = np.random.default_rng(0)
    update = {"global": rng.normal(size=(16, 8)).astype(np.float32)}
    noisy, _ = client_level_mechanism(update, clip=1.0, noise_multiplier=1.0, rng=np.random.default_rng(1))
    indices, rows = top_k_rows(noisy["global"], 5)
    assert np.array_equal(rows, noisy["global"][indices])
    assert set(indices) == set(np.argsort(-np.linalg.norm(noisy["global"], axis=1))[:5])


def test_each_row_is_averaged_over_the_clients_that_sent_it() -> None:
    current = np.ones((4, 2), dtype=np.float32)
    uploads = [
        (np.array([0, 2]), np.array([[1.0, 1.0], [2.0, 2.0]]), 1.0),
        (np.array([2, 3]), np.array([[4.0, 4.0], [-1.0, -1.0]]), 3.0),
    ]
    new, senders = average_rows(current, uploads)
    assert senders.tolist() == [1, 0, 2, 1]
    np.testing.assert_allclose(new[:, 0], [2.0, 1.0, 1 + (2 + 12) / 4, 0.0])
    with pytest.raises(ValueError):
        average_rows(current, [(np.array([1, 1]), np.zeros((2, 2)), 1.0)])
