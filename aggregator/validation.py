"""Checks at the aggregator's door on what a client reports beside its tensors.

Everything a client sends ends up in the round driver, the SQLite store, the log and `status`;
a value nobody checked there can stop a round (a privacy report with `epsilon` but no `delta`),
fill the store (100,000 metric keys) or forge log lines (a client name with a newline and ANSI
codes). So reports are checked here, once, before anything is kept: known keys only, finite
values in their ranges, and names made printable and short before they are logged or stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """Where a reported value must lie; always finite."""

    low: float = 0.0
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low < value if self.open_low else self.low <= value
        below = value < self.high if self.open_high else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        low, high = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{low}{_number(self.low)}, {_number(self.high)}{high}"


def _number(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and float(value).is_integer() else f"{value:g}"


ANY_COUNT = Interval()
SHARE = Interval(0.0, 1.0)
PRIVACY_RANGES: dict[str, Interval] = {
    "epsilon": ANY_COUNT,
    "delta": Interval(0.0, 1.0, open_low=True, open_high=True),
    "noise_multiplier": ANY_COUNT,
    "clip": ANY_COUNT,
    "accounted_noise_multiplier": ANY_COUNT,
    "sample_rate": SHARE,
    "steps": ANY_COUNT,
    "total_steps": ANY_COUNT,
    "epsilon_budget": ANY_COUNT,
}
"""What `edge_client.local_privacy.LocalAccountant.report` sends."""

METRIC_RANGES: dict[str, Interval] = {
    "accuracy": SHARE,
    "received_accuracy": SHARE,
    "train_accuracy": SHARE,
    "train_loss": ANY_COUNT,
    "steps": ANY_COUNT,
}
"""Metrics every method may send (the shared training loop's and the held-out accuracies); a
server half adds its own in `ServerStrategy.extra_metrics`."""

NAME_LIMIT = 64


class ReportError(ValueError):
    """A report the aggregator refuses; the message is one line, safe to log."""


def printable(text: str, limit: int = NAME_LIMIT) -> str:
    """`text` with every non-printable character (newlines, ANSI escapes, ...) replaced by '?'
    and cut to `limit` characters, so that a client-chosen string cannot forge or flood a log."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return shown if len(text) <= limit else f"{shown}...({len(text)} chars)"


def check_values(values: Mapping[str, float], ranges: Mapping[str, Interval], what: str) -> dict[str, float]:
    """The map as a dict, or ReportError naming the first unknown key or bad value. Known keys
    only also bounds how many keys, and so how many bytes, a report can have."""
    for key, value in values.items():
        if key not in ranges:
            raise ReportError(f"unknown {what} key {printable(key)!r}; known: {', '.join(sorted(ranges))}")
        if value not in ranges[key]:
            raise ReportError(f"{what} {key} = {_number(value)} is not a finite value in {ranges[key]}")
    return dict(values)


def check_privacy(privacy: Mapping[str, float]) -> dict[str, float]:
    """A privacy report: known keys in range, and an epsilon only with its delta."""
    report = check_values(privacy, PRIVACY_RANGES, "privacy")
    if "epsilon" in report and "delta" not in report:
        raise ReportError("privacy report has an epsilon without its delta")
    return report


def check_metrics(metrics: Mapping[str, float], extra: Mapping[str, Interval]) -> dict[str, float]:
    return check_values(metrics, {**METRIC_RANGES, **extra}, "metric")


def check_examples(num_examples: int, limit: int) -> int:
    if not 1 <= num_examples <= limit:
        raise ReportError(f"num_examples {num_examples} is not in 1..{limit} (server.max_examples)")
    return num_examples
