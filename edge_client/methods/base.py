"""What a client half of a method is: given the round's task, train locally and say what to upload."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import nn


@dataclass
class RoundTask:
    """One round as the aggregator hands it out."""

    run_id: str
    round_id: int
    method: str
    settings: dict[str, Any]
    tensors: dict[str, np.ndarray]  # the global state plus any per-client extras (e.g. experts)
    deadline_unix: float


@dataclass
class RoundResult:
    """What a client sends back: only `tensors` leave the device, plus counts, metrics and privacy."""

    tensors: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)  # e.g. epsilon, delta, sigma, clip, steps


class ClientMethod(ABC):
    """Client half of a method. Holds whatever stays on the device (local prompts, gating nets)."""

    name: ClassVar[str]

    @abstractmethod
    def run_round(self, task: RoundTask) -> RoundResult:
        """Train on local data starting from the task's tensors and return the update to upload."""

    @abstractmethod
    def head(self, task: RoundTask) -> nn.Module:
        """The classifier this device holds at the start of `task`'s round, without training: from
        the task's tensors and what the method keeps on the device to a head mapping normalised
        image features [B, D] to class logits [B, K] (`edge_client.class_heads`). After a run it
        is applied to the served model: what the harness scores and `fedprompt predict` uses."""

    def image_encoder(self, task: RoundTask) -> nn.Module | None:
        """The method's own image side at the start of `task`'s round (images [N, 3, H, W] ->
        image features [N, D]) where its classifier needs one (visual prompts), else None: the
        bundle's image encoder. `fedprompt predict`, `export-classifier` and the harness feed the
        head with it."""
        return None
