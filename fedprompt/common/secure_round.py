"""What both halves agree on in a securely aggregated round, above the `secagg` core.

A client's round result (named tensors, its example count, a few accuracy metrics) becomes ONE
float vector, which secure aggregation sums over the surviving clients; the server decodes the
sum back into per-tensor weighted sums (`WeightedSum`). Layout of the vector, in order:

    w * clip(t) for every tensor t, by name, flattened      (clip: to [-value_bound, value_bound])
    w                                                        (the client's weight)
    w * m, w * [m reported]   for m in SUMMED_METRICS        (means over the clients reporting m)

with w = min(num_examples, example_cap) / example_cap (example-weighted FedAvg), or w = 1 for
every client when example_cap is 0 (e.g. SecFPP, whose per-cluster counts are then exact). So
the server learns sum(w * t), sum(w) and the weighted means of the summed metrics; no other
metric leaves the device in a secure round (a method may keep local-only metrics, such as
SecFPP's cluster, in its result: they are never in the layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SUMMED_METRICS = ("accuracy", "received_accuracy", "train_accuracy")
"""Accuracies in [0, 1]: the only metrics that travel, and only inside the sum."""
STEPS = ("advertise keys", "share keys", "masked input", "survivor signature", "unmask")
"""The client's message of step 0..4 (see `fedprompt.common.secagg.loopback` for the order)."""
STATUSES = ("pending", "next", "done", "aborted")


class LayoutError(ValueError):
    """A tensor layout that cannot be summed (bad name or shape); one readable line."""


@dataclass(frozen=True)
class SecureRoundParams:
    """One session (an attempt at a round) as the server announces it in the task."""

    session_id: bytes
    member_id: int
    threshold: int
    degree: int | None
    modulus_bits: int
    value_bound: float
    example_cap: float
    member_names: tuple[str, ...] = ()  # the client id of each member id

    def weight(self, num_examples: int) -> float:
        """The client's weight in the sum: its capped example share, or 1 (uniform)."""
        if self.example_cap <= 0:
            return 1.0
        return min(float(num_examples), self.example_cap) / self.example_cap


@dataclass(frozen=True)
class WeightedSum:
    """What the server half of a method receives from a secure round: sum(w * t) per tensor,
    sum(w), the number of clients summed, and the weighted means of the summed metrics."""

    tensors: dict[str, np.ndarray]
    weight: float
    count: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SumLayout:
    """The names and shapes of the summed tensors (sorted by name), fixed per session by the first
    client's announcement and checked for every later one."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: dict[str, np.ndarray]) -> SumLayout:
        return cls.from_specs((name, tuple(t.shape)) for name, t in tensors.items())

    @classmethod
    def from_specs(cls, specs) -> SumLayout:
        """From (name, shape) pairs, e.g. off the wire; refuses empty or duplicate names, negative
        dimensions and an empty layout."""
        items = [(str(name), tuple(int(d) for d in shape)) for name, shape in specs]
        names = [name for name, _ in items]
        if not items or len(set(names)) != len(names) or not all(names):
            raise LayoutError("a summed layout needs at least one tensor and distinct, non-empty names")
        if any(d < 0 for _, shape in items for d in shape):
            raise LayoutError("tensor dimensions must not be negative")
        return cls(tuple(sorted(items)))

    @property
    def tensor_size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors)

    @property
    def length(self) -> int:
        """Elements of the summed vector."""
        return self.tensor_size + 1 + 2 * len(SUMMED_METRICS)

    def pack(
        self, tensors: dict[str, np.ndarray], weight: float, metrics: dict[str, float], bound: float
    ) -> tuple[np.ndarray, int]:
        """The client's float64 vector and how many tensor values were clipped to the bound."""
        if SumLayout.of(tensors) != self:
            raise LayoutError(f"tensors {sorted(tensors)} do not match the session's layout")
        flat = np.concatenate([np.asarray(tensors[name], np.float64).ravel() for name, _ in self.tensors])
        clipped = int(np.count_nonzero(np.abs(flat) > bound))
        parts = [weight * np.clip(flat, -bound, bound), [weight]]
        for name in SUMMED_METRICS:
            present = name in metrics and math.isfinite(metrics[name])
            value = float(np.clip(metrics[name], 0.0, 1.0)) if present else 0.0
            parts.append([weight * value, weight * float(present)])
        return np.concatenate([np.asarray(p, np.float64) for p in parts]), clipped

    def unpack(self, total: np.ndarray, count: int) -> WeightedSum:
        """The decoded sum of `count` clients' vectors as per-tensor sums, total weight and metric means."""
        total = np.asarray(total, np.float64)
        if total.shape != (self.length,):
            raise LayoutError(f"a sum of {total.size} values does not fit a layout of {self.length}")
        tensors, offset = {}, 0
        for name, shape in self.tensors:
            size = math.prod(shape)
            tensors[name] = total[offset : offset + size].reshape(shape)
            offset += size
        weight = float(total[offset])
        metrics = {}
        for index, name in enumerate(SUMMED_METRICS):
            value, reported = total[offset + 1 + 2 * index : offset + 3 + 2 * index]
            if reported > 1e-9:
                metrics[name] = float(value / reported)
        return WeightedSum(tensors, weight, count, metrics)


@dataclass(frozen=True)
class StepReply:
    """The server's answer to a step: `pending` (ask again after retry_after_s), `next` (the step
    closed; `message` opens the next one), `done` (the round accepted the sum) or `aborted` (this
    session is over for the client: `reason`; it asks for the round's task again)."""

    status: str
    message: bytes = b""
    retry_after_s: float = 0.0
    deadline_in_s: float = 0.0
    reason: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown step status {self.status!r}")
