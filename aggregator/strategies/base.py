"""What a server half of a method is: the global state, what each client is sent, how updates combine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from aggregator.strategies.combine import UpdateCombiner
from aggregator.validation import Interval
from fedprompt.common.methods import METHOD_SPECS, MethodSpec, RunSettings
from fedprompt.common.secure_round import WeightedSum


@dataclass
class ClientUpdate:
    """One accepted, decoded update."""

    client_id: str
    tensors: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class ServerStrategy(ABC):
    """Server half of a method. Its state must round-trip through `state_dict`/`load_state_dict`
    so that the aggregator can persist it atomically with each round; it may change only inside
    `aggregate`, whose result is committed in the same transaction as the round.

    The global state before round 1 and the names and shapes of every update come from the
    method's spec (`fedprompt.common.methods`) and the bundle's dimensions, not from here.

    Halves that average tensors do it through `self.combiner` (the configured mean or robust
    rule), so robustness is implemented once for all methods. Subclasses that override
    `__init__` pass `combiner` on.

    Halves whose spec allows secure aggregation (`sums_suffice`) implement `aggregate_sum`: the
    aggregator may then sum the updates securely, and must when the spec requires it."""

    name: ClassVar[str]
    extra_metrics: ClassVar[dict[str, Interval]] = {}
    """Client metrics of this method beyond `aggregator.validation.METRIC_RANGES`, with their ranges."""

    def __init__(self, settings: RunSettings, combiner: UpdateCombiner | None = None) -> None:
        self.settings = settings
        self.combiner = combiner or UpdateCombiner()

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.name]

    @property
    def sums_suffice(self) -> bool:
        return self.spec.secure_aggregation != "none"

    @property
    def weighs_by_examples(self) -> bool:
        """False: every client weighs 1 in the sum (the server learns counts, not example totals)."""
        return self.spec.weighs_by_examples

    def tensors_for_client(self, state: dict[str, np.ndarray], client_id: str) -> dict[str, np.ndarray]:
        """What this client is sent this round; by default the global state."""
        return state

    def update_reference(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What an update's size is measured from (for `max_update_norm` and `norm_bound`): the
        global state for methods whose clients upload new values; those uploading deltas
        return {} (measured from zero)."""
        return state

    @abstractmethod
    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Combine the round's updates into the next global state; also return round metrics."""

    def aggregate_sum(
        self, state: dict[str, np.ndarray], total: WeightedSum
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Like `aggregate`, from the weighted sum of the round's updates alone (secure aggregation)."""
        raise NotImplementedError(f"{self.name} needs the individual updates, not only their sum")

    def state_dict(self) -> dict[str, Any]:
        """Extra server-side state beyond the global tensors (pools, accountants); JSON-able."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a no-op by default)
        """Restore what `state_dict` returned."""
