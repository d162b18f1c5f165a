"""A second, independent accountant for the tests: Google's `dp-accounting` PLD (a dev dependency,
never used by fedprompt itself), and the check every printed epsilon must pass against it."""

from __future__ import annotations

from collections.abc import Iterable

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

TOLERANCE = 0.10  # fedprompt's epsilon may be at most 10% above the independent tight value


def pld_epsilon(history: Iterable[Iterable[float]], delta: float) -> float:
    """Tight epsilon of a composition of (noise multiplier, Poisson rate, steps) Gaussian entries
    (rate 1: the plain Gaussian mechanism), pessimistic PLD on a fine grid: an upper bound within
    about 1e-3 of the exact value."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        event = dp_accounting.GaussianDpEvent(float(sigma))
        if float(q) < 1:
            event = dp_accounting.PoissonSampledDpEvent(float(q), event)
        accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))


def assert_tight(epsilon: float, history: Iterable[Iterable[float]], delta: float) -> None:
    """fedprompt's epsilon is never below the independent tight value nor more than 10% above it."""
    reference = pld_epsilon(list(history), delta)
    assert reference <= epsilon <= (1 + TOLERANCE) * reference, (
        f"fedprompt's epsilon {epsilon:.4f} vs dp-accounting PLD {reference:.4f}"
    )
