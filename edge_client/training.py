"""Local prompt training on cached image features: CoOp's loss, plain (non-private) optimisation,
and local evaluation.

Logits are `logit_scale * norm(image) @ norm(text).T` and the loss is cross-entropy, as in CLIP
and CoOp. The image features are fixed (frozen encoder, cached), so a step costs one pass of the
class prompts through the text tower, whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedprompt.common.settings import TrainingSettings

TextEncoder = Callable[[torch.Tensor], torch.Tensor]  # ctx [n_ctx, W] -> text features [K, D]
BatchLoss = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # batch indices -> (loss, logits)
StepHook = Callable[[torch.Tensor], None]  # sees the trained tensor before each step, may change it in place


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
    """Mean cross-entropy of a batch and its logits (differentiable in ctx)."""
    logits = class_logits(image_features, encode(ctx), logit_scale)
    return F.cross_entropy(logits, labels), logits


def make_optimizer(parameters: Sequence[torch.Tensor], settings: TrainingSettings) -> torch.optim.Optimizer:
    """The optimiser the settings name, over the trainable tensors."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        parameters, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


@dataclass
class TrainStats:
    """Running loss and accuracy over the examples a round trained on."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(loss) * len(labels)
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.seen += len(labels)
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        seen = max(self.seen, 1)
        return {
            "train_loss": self.loss_sum / seen,
            "train_accuracy": self.correct / seen,
            "steps": self.steps,
        }


def train_steps(
    parameters: Sequence[torch.Tensor],
    batch_loss: BatchLoss,
    labels: torch.Tensor,
    settings: TrainingSettings,
    generator: torch.Generator,
) -> TrainStats:
    """Non-private optimisation of any trainable tensors under any loss (methods with more than a
    prompt, e.g. a gating network, train through this): `local_epochs` passes over shuffled batches."""
    optimizer = make_optimizer(parameters, settings)
    stats = TrainStats()
    for _ in range(settings.local_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(settings.batch_size):
            loss, logits = batch_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            stats.add(loss.detach(), logits.detach(), labels[batch])
    return stats


def train_plain(
    ctx: torch.Tensor,
    encode: TextEncoder,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    settings: TrainingSettings,
    generator: torch.Generator,
    before_step: StepHook | None = None,
) -> tuple[torch.Tensor, TrainStats]:
    """Non-private local training of a context under CoOp's loss. Returns the new ctx.

    `ctx` may be any tensor that `encode` maps to class text features (a method's parts packed
    into one vector); `before_step` may re-parametrise it in place before every step."""
    parameter = ctx.detach().clone().requires_grad_(True)

    def batch_loss(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if before_step is not None:
            with torch.no_grad():
                before_step(parameter)
        return prompt_loss(parameter, encode, image_features[batch], labels[batch], logit_scale)

    stats = train_steps([parameter], batch_loss, labels, settings, generator)
    return parameter.detach(), stats


@torch.no_grad()
def accuracy(
    ctx: torch.Tensor,
    encode: TextEncoder,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
) -> float:
    """Top-1 accuracy; the class text features are computed once for all examples."""
    logits = class_logits(image_features, encode(ctx), logit_scale)
    return float((logits.argmax(dim=1) == labels).float().mean())
