"""The DP mechanisms against their definitions and the accountant against opacus' own functions."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as rdp_analysis

from fedprompt.common.privacy import (
    BudgetExceeded,
    PrivacyAccountant,
    PrivacyStateError,
    client_level_accounting,
    client_level_mechanism,
    clip_to_norm,
    l2_norm,
)

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def test_clipping_bounds_the_joint_norm_and_keeps_small_updates() -> None:
    rng = np.random.default_rng(0)
    big = {"a": rng.normal(size=(4, 8)).astype(np.float32) * 10, "b": rng.normal(size=3).astype(np.float32)}
    clipped, norm = clip_to_norm(big, 1.5)
    assert norm > 1.5 and l2_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    np.testing.assert_allclose(clipped["a"] / big["a"], clipped["b"][0] / big["b"][0], rtol=1e-5)
    small = {"a": np.full((2,), 0.1, np.float32)}
    assert np.array_equal(clip_to_norm(small, 1.0)[0]["a"], small["a"])


def test_client_level_noise_std_is_sigma_times_clip() -> None:
    """The noise actually added has std sigma*C: a chi-square style check on 200k entries whose
    tolerance (1%) is about 7 standard errors, so a wrong factor (e.g. sigma/2 or 2*sigma) fails."""
    sigma, clip = 0.7, 3.0
    zero = {"ctx": np.zeros((400, 500), np.float32)}
    noised, norm = client_level_mechanism(zero, clip, sigma, np.random.default_rng(1))
    assert norm == 0.0
    added = noised["ctx"].astype(np.float64)
    assert abs(added.mean()) < 0.02
    assert added.std() == pytest.approx(sigma * clip, rel=0.01)


def test_client_level_update_is_clipped_before_noise() -> None:
    update = {"ctx": np.full((10, 10), 5.0, np.float32)}
    noised, norm = client_level_mechanism(update, 1.0, 1e-6, np.random.default_rng(2))
    assert norm == pytest.approx(50.0)
    assert l2_norm(noised) == pytest.approx(1.0, abs=1e-3)


def test_client_level_accounting_uses_replacement_sensitivity() -> None:
    assert client_level_accounting(1.2) == {"noise_multiplier": 0.6, "sample_rate": 1.0, "steps": 1}


def test_rdp_epsilon_equals_opacus_analysis_for_the_recorded_history() -> None:
    accountant = PrivacyAccountant("rdp")
    accountant.step(1.1, 0.05, steps=30)
    accountant.step(1.1, 0.05, steps=10)  # merged with the entry before
    accountant.step(0.6, 1.0)
    assert accountant.history == [(1.1, 0.05, 40), (0.6, 1.0, 1)]
    rdp = rdp_analysis.compute_rdp(q=0.05, noise_multiplier=1.1, steps=40, orders=ORDERS)
    rdp = rdp + rdp_analysis.compute_rdp(q=1.0, noise_multiplier=0.6, steps=1, orders=ORDERS)
    expected, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5)
    assert accountant.epsilon(1e-5) == pytest.approx(float(expected), rel=1e-12)
    assert accountant.report(1e-5)["history"] == [[1.1, 0.05, 40], [0.6, 1.0, 1]]


def test_prv_epsilon_is_finite_and_tighter_than_rdp() -> None:
    rdp, prv = PrivacyAccountant("rdp"), PrivacyAccountant("prv")
    for accountant in (rdp, prv):
        accountant.step(1.0, 0.02, steps=200)
    assert 0 < prv.epsilon(1e-5) < rdp.epsilon(1e-5)


def test_state_round_trips_through_json_and_continues(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    first = PrivacyAccountant.load(path, "rdp")
    assert first.epsilon(1e-5) == 0.0
    first.step(0.5, 1.0)
    first.save(path)
    restored = PrivacyAccountant.load(path, "rdp")
    assert restored.epsilon(1e-5) == first.epsilon(1e-5) > 0
    restored.step(0.5, 1.0)
    uninterrupted = PrivacyAccountant("rdp", [(0.5, 1.0, 2)])
    assert restored.epsilon(1e-5) == uninterrupted.epsilon(1e-5) > first.epsilon(1e-5)


def test_unreadable_or_mismatched_state_refuses_instead_of_resetting(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    path.write_text("{not json")
    with pytest.raises(PrivacyStateError, match="unreadable"):
        PrivacyAccountant.load(path, "rdp")
    PrivacyAccountant("prv", [(1.0, 1.0, 1)]).save(path)
    with pytest.raises(PrivacyStateError, match="holds a prv accountant, settings ask for rdp"):
        PrivacyAccountant.load(path, "rdp")


def test_budget_refusal_names_the_spend_and_records_nothing() -> None:
    accountant = PrivacyAccountant("rdp")
    step = client_level_accounting(1.0)
    two_rounds = accountant.epsilon_after(1e-5, step["noise_multiplier"], 1.0, steps=2)
    three_rounds = accountant.epsilon_after(1e-5, step["noise_multiplier"], 1.0, steps=3)
    budget = (two_rounds + three_rounds) / 2  # room for two rounds, not three
    for _ in range(2):
        accountant.check_budget(budget, 1e-5, step["noise_multiplier"], 1.0)
        accountant.step(step["noise_multiplier"], 1.0)
    with pytest.raises(BudgetExceeded, match="refusing to train") as error:
        accountant.check_budget(budget, 1e-5, step["noise_multiplier"], 1.0)
    assert f"budget {budget:g}" in str(error.value)
    assert accountant.steps == 2
