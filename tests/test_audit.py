"""The privacy audit: its statistics against their definitions and a known mechanism, and one
small audit of real PromptFL runs (attacks in range, empirical epsilon within the accounted)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from colour_images import write_colour_folder
from scipy.stats import norm
from test_accounting import exact_gaussian_epsilon

from edge_client.workspace import ClientWorkspace
from fedprompt.common.settings import TrainingSettings
from fedprompt.harness.audit import (
    audit_entry,
    clopper_pearson_upper,
    epsilon_lower_bound,
    roc_auc,
    tpr_at_fpr,
)
from fedprompt.harness.experiment_config import AuditConfig
from fedprompt.harness.in_process import FederationRules


def test_auc_and_tpr_follow_their_definitions() -> None:
    rng = np.random.default_rng(0)
    members, others = rng.normal(1, 1, 300), rng.normal(0, 1, 400)
    pairs = (members[:, None] > others[None, :]).mean() + 0.5 * (members[:, None] == others[None, :]).mean()
    assert roc_auc(members, others) == pytest.approx(pairs, abs=1e-12)
    assert roc_auc(members, others) == pytest.approx(norm.cdf(1 / math.sqrt(2)), abs=0.04)
    threshold = np.quantile(others, 0.99, method="higher")
    assert tpr_at_fpr(members, others, 0.01) == np.mean(members > threshold)
    assert roc_auc(others, others) == pytest.approx(0.5)


def test_clopper_pearson_upper_bound() -> None:
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert clopper_pearson_upper(100, 100, 0.05) == 1.0
    rng = np.random.default_rng(1)  # it covers the true rate at least 95% of the time
    covered = [clopper_pearson_upper(int(rng.binomial(60, 0.2)), 60, 0.05) >= 0.2 for _ in range(2000)]
    assert np.mean(covered) >= 0.95


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_the_bound_never_exceeds_a_known_gaussian_mechanisms_epsilon(sigma: float) -> None:
    """Scores of a Gaussian mechanism of sensitivity 1: N(1, sigma^2) with the canary, N(0, sigma^2)
    without; the lower bound from 2000 trials is positive and below the mechanism's exact epsilon."""
    rng = np.random.default_rng(2)
    scores_in, scores_out = rng.normal(1, sigma, 1000), rng.normal(0, sigma, 1000)
    bound = epsilon_lower_bound(scores_in, scores_out, 1e-5, 0.95)
    assert 0 < bound <= exact_gaussian_epsilon(sigma, 1, 1e-5)
    separated = epsilon_lower_bound(np.full(100, 1.0), np.zeros(100), 1e-5, 0.95)
    no_error = clopper_pearson_upper(0, 50, 0.025)  # both rates on the 50 + 50 test trials
    assert separated == pytest.approx(math.log((1 - 1e-5 - no_error) / no_error), rel=1e-9)


def test_a_small_audit_of_real_promptfl_runs(tiny_bundle: Path, tmp_path: Path) -> None:
    data = write_colour_folder(tmp_path / "data", per_class=12)
    workspaces = [
        ClientWorkspace.load(tiny_bundle, data, data, state_dir=tmp_path / f"cache{i}", progress=False)
        for i in range(2)
    ]
    rules = FederationRules(rounds=2, fraction=1.0, seed=0, task_encoding="fp32", update_encoding="fp32")
    audit = AuditConfig(trials=20, canaries=4)
    for label, settings in (
        ("no DP", TrainingSettings(n_ctx=2, batch_size=8, lr=0.05)),
        ("client DP", TrainingSettings(n_ctx=2, batch_size=8, lr=0.05, dp="client", noise_multiplier=1.0)),
    ):
        row = audit_entry(label, settings, workspaces, rules, audit, tmp_path / label.replace(" ", "-"))
        for value in (row.upload_auc, row.upload_tpr, row.served_auc, row.served_tpr):
            assert 0.0 <= value <= 1.0
        assert row.empirical_epsilon >= 0 and row.trials == 20
        if settings.dp == "none":
            assert row.epsilon_run is None and row.epsilon_round is None
        else:
            assert row.empirical_epsilon > 0 or row.empirical_epsilon == 0
            assert row.empirical_epsilon <= row.epsilon_round <= row.epsilon_run
