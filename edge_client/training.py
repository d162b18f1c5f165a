"""The one training core of every method: an `Objective` (the trainable tensors' per-example loss),
plain optimisation of it, and local evaluation.

A method describes its training problem as an `Objective`: `classify(shared, params, inputs)` gives
class logits for a batch of examples, where `params` are the trainable tensors (a dict, trained
jointly) and `shared` is what the objective computes once per batch from them, independently of the
examples (`shared(params)`: e.g. the class text features of a CoOp prompt). The per-example loss
is cross-entropy of those logits unless the method says otherwise (`losses`). The same objective
is trained plainly here and under DP-SGD by `edge_client.dp_sgd`, and evaluated by `accuracy`.

CoOp's loss (`PromptObjective`): logits `logit_scale * norm(image) @ norm(text).T` on cached image
features, so a step costs one pass of the class prompts through the text tower whatever the batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fedprompt.common.settings import TrainingSettings

TextEncoder = Callable[[torch.Tensor], torch.Tensor]  # ctx [n_ctx, W] -> text features [K, D]
Params = dict[str, torch.Tensor]  # a method's trainable tensors, by name
Inputs = tuple[torch.Tensor, ...]  # per-example inputs, each indexed by example on dim 0


def normalise(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


def class_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """[B, K] logits of normalised image features [B, D] against raw text features [K, D]."""
    return logit_scale * image_features @ normalise(text_features).T


def prompt_loss(
    ctx: torch.Tensor,
    encode: TextEncoder,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CoOp cross-entropy of a batch and its logits (differentiable in ctx): the reference
    one-at-a-time computation of tests and of the training benchmark."""
    logits = class_logits(image_features, encode(ctx), logit_scale)
    return F.cross_entropy(logits, labels), logits


class Objective(ABC):
    """A method's training problem: a per-example loss of its trainable tensors.

    `example_independent` declares that the trainable tensors reach the loss only through
    `shared(params)` (CoOp text prompts): DP-SGD may then take the exact vector-Jacobian fast path
    (one tower pass per batch) instead of per-example gradients through everything."""

    example_independent: ClassVar[bool] = False

    def shared(self, params: Params) -> Any:
        """What a batch needs computed once from the trainable tensors (none by default)."""
        return None

    @abstractmethod
    def classify(self, shared: Any, params: Params, inputs: Inputs) -> torch.Tensor:
        """[B, K] class logits of a batch of examples."""

    def losses(
        self, shared: Any, params: Params, inputs: Inputs, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses [B] and the logits [B, K] they come from (cross-entropy by default)."""
        logits = self.classify(shared, params, inputs)
        return F.cross_entropy(logits, labels, reduction="none"), logits

    def frozen(self, params: Params) -> Params:
        """The tensors as constants of a classifier that no longer trains (`edge_client.class_heads`):
        an objective that applies a module functionally may load them into it and return the rest,
        so the classifier traces to ONNX. All of them, unchanged, by default."""
        return params

    def before_step(self, params: Params) -> None:  # noqa: B027 (no re-parametrisation by default)
        """Re-parametrise the trainable tensors in place before each step (e.g. DP-FPL's
        re-factorisation); a function of the previous iterate only, so post-processing under DP."""


class PromptObjective(Objective):
    """CoOp's loss on cached image features: the trainable tensors map to class text features
    (`text_features`), the inputs are (normalised image features [B, D],)."""

    example_independent = True

    def __init__(self, text_features: Callable[[Params], torch.Tensor], logit_scale: float) -> None:
        self.text_features = text_features
        self.logit_scale = logit_scale

    @classmethod
    def coop(cls, encode: TextEncoder, logit_scale: float) -> PromptObjective:
        """One context `ctx` [n_ctx, W] for every class (CoOp, PromptFL)."""
        return cls(lambda params: encode(params["ctx"]), logit_scale)

    def shared(self, params: Params) -> torch.Tensor:
        return self.text_features(params)

    def classify(self, shared: torch.Tensor, params: Params, inputs: Inputs) -> torch.Tensor:
        return class_logits(inputs[0], shared, self.logit_scale)


def select(inputs: Inputs, batch: torch.Tensor) -> Inputs:
    return tuple(tensor[batch] for tensor in inputs)


def make_optimizer(parameters: Sequence[torch.Tensor], settings: TrainingSettings) -> torch.optim.Optimizer:
    """The optimiser the settings name, over the trainable tensors."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        parameters, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


@dataclass
class TrainStats:
    """Running loss and accuracy over the examples a round trained on (accuracy only where the
    labels are class indices [B]; a captioning objective's labels are token ids [B, L])."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    classified: bool = True

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(loss) * len(labels)
        self.classified = self.classified and labels.dim() == 1
        if self.classified:
            self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.seen += len(labels)
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        seen = max(self.seen, 1)
        accuracy = {"train_accuracy": self.correct / seen} if self.classified else {}
        return {"train_loss": self.loss_sum / seen, **accuracy, "steps": self.steps}


def train_plain(
    objective: Objective,
    params: Params,
    inputs: Inputs,
    labels: torch.Tensor,
    settings: TrainingSettings,
    generator: torch.Generator,
) -> tuple[Params, TrainStats]:
    """Non-private optimisation of the objective: `local_epochs` passes over shuffled batches, the
    mean loss of each batch stepped by the settings' optimiser. Returns the new tensors."""
    trained = {name: tensor.detach().clone().requires_grad_(True) for name, tensor in params.items()}
    optimizer = make_optimizer(list(trained.values()), settings)
    stats = TrainStats()
    for _ in range(settings.local_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(settings.batch_size):
            with torch.no_grad():
                objective.before_step(trained)
            shared = objective.shared(trained)
            losses, logits = objective.losses(shared, trained, select(inputs, batch), labels[batch])
            loss = losses.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            stats.add(loss.detach(), logits.detach(), labels[batch])
    return {name: tensor.detach() for name, tensor in trained.items()}, stats


@torch.no_grad()
def predict(objective: Objective, params: Params, inputs: Inputs) -> torch.Tensor:
    """[B, K] logits; `shared` is computed once for all examples."""
    return objective.classify(objective.shared(params), params, inputs)


def accuracy(objective: Objective, params: Params, inputs: Inputs, labels: torch.Tensor) -> float:
    """Top-1 accuracy of the objective's classifier."""
    return float((predict(objective, params, inputs).argmax(dim=1) == labels).float().mean())
