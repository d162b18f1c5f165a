"""What a client half of a method is: the round skeleton every method shares (`ClientMethod`), and
the few parts a method supplies.

A round: parse the task's settings against the method's spec (core + its client section; the DP
mode and cross-section rules are checked there), let the method `prepare` its objective and
starting tensors from the task and what it keeps on the device (nothing is paid yet, so a task
that does not fit costs no privacy), pay the round's local DP cost to the device's accountant,
measure the starting model on the local hold-out, train (DP-SGD under `dp = "sample"`, plain
otherwise), let the method say what it `upload`s and `keep`s, measure the model it serves, and
return the result with the privacy report. The same `prepare` gives the device's classifier
(`head`) for the harness and `fedprompt predict`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedprompt.common.methods import TaskSettings

if TYPE_CHECKING:  # torch stays out of what the runtime imports (and of its light test doubles)
    from torch import nn

    from edge_client.training import Inputs, Objective, Params
    from edge_client.workspace import ClientWorkspace, LabelledFeatures


@dataclass
class RoundTask:
    """One round as the aggregator hands it out."""

    run_id: str
    round_id: int
    method: str
    settings: dict[str, Any]  # {"core": {...}, "client": {...}}: `TaskSettings.to_dict()`
    tensors: dict[str, np.ndarray]  # the global state plus any per-client extras (e.g. experts)
    deadline_unix: float


@dataclass
class RoundResult:
    """What a client sends back: only `tensors` leave the device, plus counts, metrics and privacy."""

    tensors: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)  # e.g. epsilon, delta, sigma, clip, steps


@dataclass
class LocalRound:
    """A method's round as `prepare` sets it up: the task, its parsed settings, the objective and
    the tensors training starts from; `metrics` collects the method's own metrics. Methods may
    subclass it to carry what their `upload` and `keep` need."""

    task: RoundTask
    settings: TaskSettings
    objective: Objective
    params: Params
    metrics: dict[str, float] = field(default_factory=dict)


class ClientHalf(ABC):
    """What the runtime drives: a method's client half by name, on one bundle."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def bundle_digest(self) -> str:
        """The bundle this device trains on (a task for another bundle stops the client)."""

    @abstractmethod
    def run_round(self, task: RoundTask) -> RoundResult:
        """Train on local data starting from the task's tensors and return the update to upload."""


class ClientMethod(ClientHalf):
    """Client half of a method, on one device's workspace; it holds whatever stays on the device
    (local prompts, gating networks) in the workspace's state folder."""

    def __init__(self, workspace: ClientWorkspace) -> None:
        self.workspace = workspace

    @property
    def bundle_digest(self) -> str:
        return self.workspace.bundle.digest

    @abstractmethod
    def prepare(self, task: RoundTask, settings: TaskSettings) -> LocalRound:
        """The round's objective and starting tensors, from the task and the local state."""

    @abstractmethod
    def upload(self, round_: LocalRound, trained: Params) -> dict[str, np.ndarray]:
        """What leaves the device (privatised here under client-level DP)."""

    def keep(self, round_: LocalRound, trained: Params) -> None:
        """Save what stays on the device after the round."""

    def served(self, round_: LocalRound, trained: Params, upload: dict[str, np.ndarray]) -> Params:
        """The tensors of the model the device uses after the round (its `accuracy`)."""
        return trained

    def head(self, task: RoundTask) -> nn.Module:
        """The classifier this device holds at the start of `task`'s round, without training: the
        objective's classifier at the tensors `prepare` starts from (`edge_client.class_heads`),
        mapping normalised image features [B, D] to class logits [B, K]. After a run it is applied
        to the served model: what the harness scores and `fedprompt predict` uses."""
        from edge_client.class_heads import ObjectiveHead

        round_ = self.prepare(task, TaskSettings.from_dict(self.name, task.settings))
        return ObjectiveHead(round_.objective, round_.params)

    def image_encoder(self, task: RoundTask) -> nn.Module | None:
        """The method's own image side at the start of `task`'s round (images [N, 3, H, W] ->
        image features [N, D]) where its classifier needs one (visual prompts), else None: the
        bundle's image encoder. `fedprompt predict`, `export-classifier` and the harness feed the
        head with it."""
        return None

    def held_out_metrics(self, objective: Objective, params: Params) -> dict[str, float]:
        """What the model at `params` scores on the local hold-out (none without one): top-1
        accuracy by default. The round reports it for the received and the served model, the
        first as `received_<name>`."""
        from edge_client.training import accuracy

        held_out = self.workspace.evaluation
        if not len(held_out):
            return {}
        return {"accuracy": accuracy(objective, params, self.inputs(held_out), held_out.labels)}

    def inputs(self, split: LabelledFeatures) -> Inputs:
        """The objective's per-example inputs of a local split: its cached image features."""
        return (split.features,)

    def run_round(self, task: RoundTask) -> RoundResult:
        from edge_client.dp_sgd import train_dp_sgd
        from edge_client.methods.round_parts import paid_round, round_generator
        from edge_client.training import train_plain

        ws = self.workspace
        settings = TaskSettings.from_dict(self.name, task.settings)
        round_ = self.prepare(task, settings)
        core, objective = settings.core, round_.objective
        accountant, cost = paid_round(ws, core)
        metrics = dict(round_.metrics)
        received = self.held_out_metrics(objective, round_.params)
        metrics.update({f"received_{name}": value for name, value in received.items()})
        train = (self.inputs(ws.train), ws.train.labels)
        if core.dp == "sample":
            trained, stats = train_dp_sgd(
                objective, round_.params, *train, core, cost.sample_rate, cost.steps
            )
        else:
            trained, stats = train_plain(
                objective, round_.params, *train, core, round_generator(core, task.round_id)
            )
        upload = self.upload(round_, trained)
        self.keep(round_, trained)
        metrics.update(stats.metrics())
        metrics.update(round_.metrics)  # what upload and keep added
        metrics.update(self.held_out_metrics(objective, self.served(round_, trained, upload)))
        return RoundResult(upload, len(ws.train), metrics, accountant.report(cost))
