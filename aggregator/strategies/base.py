"""What a server half of a method is: the global state, what each client is sent, how updates combine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class ClientUpdate:
    """One accepted, decoded update."""

    client_id: str
    tensors: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class ServerStrategy(ABC):
    """Server half of a method. Its state must round-trip through `state_dict`/`load_state_dict`
    so that the aggregator can persist it atomically with each round."""

    name: ClassVar[str]

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

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

    @abstractmethod
    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Combine the round's updates into the next global state; also return round metrics."""

    def state_dict(self) -> dict[str, Any]:
        """Extra server-side state beyond the global tensors (pools, accountants); JSON-able."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a no-op by default)
        """Restore what `state_dict` returned."""
