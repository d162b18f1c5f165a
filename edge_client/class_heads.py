"""What a trained method classifies with on the device: its training objective's classifier at
fixed tensors, as a module from normalised image features to class logits.

Every method's client half builds its head from a round's task and what it keeps on the device
(`ClientMethod.head`) with the same `Objective` it trains and scores its rounds with, so the
harness, `fedprompt predict` and `fedprompt export-classifier` all classify with the one
definition. What the objective computes once from the tensors (`shared`: the class text features)
is computed when the head is built, so a prediction costs only the objective's `classify`; the head
is a plain `nn.Module` and exports to ONNX as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from edge_client.datasets import ImageSet
from edge_client.preprocess import ImagePreprocessor
from edge_client.training import Objective, Params, normalise

if TYPE_CHECKING:
    from edge_client.bundle import Bundle

ENCODER_BATCH = 64


class ObjectiveHead(nn.Module):
    """`objective.classify` at fixed tensors `params`, its `shared` part computed once."""

    def __init__(self, objective: Objective, params: Params) -> None:
        super().__init__()
        self.objective = objective
        self.params = objective.frozen({name: tensor.detach() for name, tensor in params.items()})
        with torch.no_grad():
            self.shared = objective.shared(self.params)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.objective.classify(self.shared, self.params, (images,))


@torch.no_grad()
def head_accuracy(head: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a head on normalised image features."""
    if len(labels) == 0:
        return float("nan")
    return float((head(images).argmax(dim=1) == labels).double().mean())


@torch.no_grad()
def encoded_features(encoder: nn.Module, images: ImageSet, bundle: Bundle) -> torch.Tensor:
    """Normalised features [N, D] of images by a method's own image side (`ClientMethod.
    image_encoder`), from the bundle's preprocessing."""
    preprocess = ImagePreprocessor(bundle.preprocess)
    chunks = [torch.zeros(0, bundle.embed_dim)]
    for start in range(0, len(images), ENCODER_BATCH):
        indices = range(start, min(start + ENCODER_BATCH, len(images)))
        chunks.append(
            normalise(encoder(torch.from_numpy(np.stack([preprocess(images.rgb(i)) for i in indices]))))
        )
    return torch.cat(chunks)
