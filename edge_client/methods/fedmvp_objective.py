"""FedMVP's training problem: PromptFormer prompts through the frozen image tower.

Per example: the PromptFormer turns the image's patch embeddings and the attribute text features
into P prompt tokens; the frozen tower encodes the image with them; the logit of class k is the
mean over k's attribute sentences of `logit_scale * cos(prompted feature, sentence feature)` (the
official code's mean aggregation: the dot product with the mean of the class's normalised
sentence features); the loss is cross-entropy plus `alpha * (1 - cos(prompted feature, frozen
feature of the horizontally flipped image))`.

Inputs are (patch embeddings [B, 1+T, Wv] from `FrozenImageTower.embed`, flipped-image frozen
features [B, D]): both frozen functions of the image, computed once (`edge_client.methods.
fedmvp_inputs`), so a step runs only the PromptFormer and the tower's blocks. The attribute text
features are constants of the objective, computed once with the frozen text tower. Trainable
tensors reach the loss per example (through the image's own prompts), so DP-SGD takes the generic
per-example path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edge_client import promptformer
from edge_client.image_tower import FrozenImageTower
from edge_client.training import Inputs, Objective, Params, normalise
from fedprompt.common.promptformer import pooling_matrix


def class_average(sentence_classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """[K, M] matrix averaging each class's sentences (sentence m belongs to class sentence_classes[m])."""
    owners = torch.as_tensor(list(sentence_classes), dtype=torch.int64)
    matrix = F.one_hot(owners, num_classes).T.to(torch.float32)
    counts = matrix.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("every class needs at least one sentence")
    return matrix / counts


class FedMVPObjective(Objective):
    """See the module docstring. `text_features` [M, D] are the normalised features of the M
    attribute sentences, `sentence_classes` the class of each."""

    def __init__(
        self,
        tower: FrozenImageTower,
        text_features: torch.Tensor,
        sentence_classes: Sequence[int],
        num_classes: int,
        logit_scale: float,
        prompt_tokens: int,
        heads: int,
        alpha: float,
    ) -> None:
        self.tower = tower
        self.text_features = text_features
        self.class_features = class_average(sentence_classes, num_classes) @ text_features  # [K, D]
        self.logit_scale = logit_scale
        self.heads = heads
        self.alpha = alpha
        self.pooling = torch.from_numpy(pooling_matrix(tower.spec.tokens, prompt_tokens))

    def shared(self, params: Params) -> promptformer.Context:
        return promptformer.context(params, self.text_features, self.tower.spec.width)

    def prompted_features(
        self, shared: promptformer.Context, params: Params, embedded: torch.Tensor
    ) -> torch.Tensor:
        """Normalised image features [B, D] of the prompted frozen tower."""
        width = self.tower.spec.width
        tokens = promptformer.prompts(params, shared, embedded[:, 1:], self.heads, self.pooling, width)
        features, _ = self.tower.encode(embedded, tokens)
        return normalise(features)

    def logits_of(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * features @ self.class_features.T

    def classify(self, shared: promptformer.Context, params: Params, inputs: Inputs) -> torch.Tensor:
        return self.logits_of(self.prompted_features(shared, params, inputs[0]))

    def losses(
        self, shared: promptformer.Context, params: Params, inputs: Inputs, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.prompted_features(shared, params, inputs[0])
        logits = self.logits_of(features)
        consistency = 1.0 - F.cosine_similarity(features, inputs[1], dim=-1, eps=1e-7)
        return F.cross_entropy(logits, labels, reduction="none") + self.alpha * consistency, logits


class FedMVPImageEncoder(nn.Module):
    """The device's image side after training: images [N, 3, H, W] -> normalised prompted image
    features [N, D] (tower embedding, PromptFormer at fixed tensors, prompted tower). It replaces
    the bundle's image encoder in FedMVP's classifier and exports to ONNX as one graph."""

    def __init__(self, objective: FedMVPObjective, params: Params) -> None:
        super().__init__()
        self.objective = objective
        self.params = {name: tensor.detach() for name, tensor in params.items()}
        with torch.no_grad():
            self.shared = objective.shared(self.params)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embedded = self.objective.tower.embed(images)
        return self.objective.prompted_features(self.shared, self.params, embedded)


class FedMVPHead(nn.Module):
    """Image features [N, D] -> class logits [N, K] against the class attribute features."""

    def __init__(self, objective: FedMVPObjective) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.objective.logits_of(normalise(features))
