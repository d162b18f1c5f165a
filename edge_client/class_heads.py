"""What a trained method classifies with on the device: a head from normalised image features to
class logits, built once from the prompts (their class text features are constants of the head).

Every method's client half builds its head from a round's task and what it keeps on the device
(`ClientMethod.head`), so the harness, `fedprompt predict` and `fedprompt export-classifier` all
classify with the one definition; a head is a plain `nn.Module`, so it exports to ONNX as is.
Most methods classify with `LinearHead`; one with another classifier defines its head in its own
module (pFedMoAP: `edge_client.methods.moe_gating.MixtureHead`).
"""

from __future__ import annotations

import torch
from torch import nn

from edge_client.training import normalise


class LinearHead(nn.Module):
    """CLIP's classifier: `images @ (logit_scale * normalise(text).T)`, one matrix product."""

    def __init__(self, text_features: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", (logit_scale * normalise(text_features.detach()).T).contiguous())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images @ self.weight


@torch.no_grad()
def head_accuracy(head: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a head on normalised image features."""
    if len(labels) == 0:
        return float("nan")
    return float((head(images).argmax(dim=1) == labels).float().mean())
