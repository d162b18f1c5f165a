"""What a server half of a method is: the global state, what each client is sent, how updates combine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from aggregator.strategies.combine import UpdateCombiner
from aggregator.validation import Interval
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

    Halves that average tensors do it through `self.combiner` (the configured mean or robust
    rule), so robustness is implemented once for all methods. Subclasses that override
    `__init__` pass `combiner` on.

    Halves that need only the weighted sum of the updates set `sums_suffice` and implement
    `aggregate_sum`; the aggregator may then sum the updates by secure aggregation, and must when
    `needs_secure_aggregation` is set. `weighs_by_examples` False makes every client weigh 1 in
    that sum (the server then learns exact counts instead of example totals)."""

    name: ClassVar[str]
    sums_suffice: ClassVar[bool] = False
    needs_secure_aggregation: ClassVar[bool] = False
    weighs_by_examples: ClassVar[bool] = True
    extra_metrics: ClassVar[dict[str, Interval]] = {}
    """Client metrics of this method beyond `aggregator.validation.METRIC_RANGES`, with their ranges."""

    def __init__(self, settings: dict[str, Any], combiner: UpdateCombiner | None = None) -> None:
        self.settings = settings
        self.combiner = combiner or UpdateCombiner()

    @abstractmethod
    def initial_state(self) -> dict[str, np.ndarray]:
        """The global tensors before round 1."""

    def tensors_for_client(self, state: dict[str, np.ndarray], client_id: str) -> dict[str, np.ndarray]:
        """What this client is sent this round; by default the global state."""
        return state

    def update_spec(self, state: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]] | None:
        """Names and shapes every update must have; None = not known yet (e.g. before round 1),
        then the first accepted update of the round sets them for the rest of the round."""
        return {name: tensor.shape for name, tensor in state.items()} or None

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
