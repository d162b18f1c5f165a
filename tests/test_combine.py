"""The server's update combiner: the weighted mean is FedAvg, and one malicious update, however
large, moves the median, the trimmed mean and the norm-bounded mean only within their bounds while
it drags the plain mean along."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aggregator.strategies.base import ClientUpdate
from aggregator.strategies.combine import UpdateCombiner, distance

SHAPE = (3, 4)
honest_values = arrays(np.float32, SHAPE, elements=st.floats(-1, 1, width=32))
attack = st.floats(1e3, 1e8) | st.floats(-1e8, -1e3)


def updates_of(values: list[np.ndarray], examples: list[int] | None = None) -> list[ClientUpdate]:
    examples = examples or [10] * len(values)
    return [
        ClientUpdate(f"c{i}", {"ctx": v}, n) for i, (v, n) in enumerate(zip(values, examples, strict=True))
    ]


def test_mean_is_fedavg_weighted_by_example_count() -> None:
    values = [np.full(SHAPE, 1.0, np.float32), np.full(SHAPE, 4.0, np.float32)]
    combined, metrics = UpdateCombiner().combine({}, updates_of(values, [30, 10]))
    np.testing.assert_allclose(combined["ctx"], 1.75)
    assert combined["ctx"].dtype == np.float32
    assert metrics["max_update_distance"] == pytest.approx(distance({"ctx": values[1]}, {}))


@settings(max_examples=60, deadline=None)
@given(honest=st.lists(honest_values, min_size=3, max_size=7), shift=attack, lie=st.integers(1, 10**9))
def test_one_attacker_stays_inside_the_honest_range_under_median_and_trimmed_mean(
    honest: list[np.ndarray], shift: float, lie: int
) -> None:
    attacker = np.full(SHAPE, shift, np.float32)
    updates = updates_of([*honest, attacker], [10] * len(honest) + [lie])  # it lies about its size too
    low, high = np.min(honest, axis=0), np.max(honest, axis=0)
    trim = 1 / len(updates) + 1e-9  # cuts exactly one value at each end
    for combiner in (UpdateCombiner("median"), UpdateCombiner("trimmed_mean", trim_fraction=trim)):
        combined = combiner.combine({}, updates)[0]["ctx"]
        assert np.all(combined >= low - 1e-6) and np.all(combined <= high + 1e-6), combiner.rule
    plain = UpdateCombiner("mean").combine({}, updates)[0]["ctx"]
    assert np.all(plain > high) or np.all(plain < low)  # the plain mean leaves with the attacker


@settings(max_examples=60, deadline=None)
@given(
    honest=st.lists(honest_values, min_size=1, max_size=5),
    reference=honest_values,
    shift=attack,
    bound=st.floats(0.1, 5.0),
    rule=st.sampled_from(["mean", "median", "trimmed_mean"]),
)
def test_norm_bound_keeps_any_rule_within_the_bound_of_the_global_model(
    honest: list[np.ndarray], reference: np.ndarray, shift: float, bound: float, rule: str
) -> None:
    attacker = reference + np.full(SHAPE, shift, np.float32)
    combiner = UpdateCombiner(rule, norm_bound=bound)
    combined, metrics = combiner.combine({"ctx": reference}, updates_of([*honest, attacker]))
    assert distance(combined, {"ctx": reference}) <= bound * (1 + 1e-5)
    assert metrics["clipped_updates"] >= 1 and metrics["max_update_distance"] > bound


def test_updates_within_the_bound_are_left_as_they_are() -> None:
    values = [np.full(SHAPE, 0.1, np.float32), np.full(SHAPE, 0.3, np.float32)]
    combined, metrics = UpdateCombiner(norm_bound=10.0).combine({}, updates_of(values))
    np.testing.assert_allclose(combined["ctx"], 0.2, rtol=1e-6)
    assert metrics["clipped_updates"] == 0


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown aggregation rule 'mode'"):
        UpdateCombiner("mode")
    with pytest.raises(ValueError, match="trim_fraction"):
        UpdateCombiner("trimmed_mean", trim_fraction=0.5)
