"""Training caption prompts on the device through the frozen captioner (transformers' T5 in torch).

The prompt is either one shared soft prompt {"prompt": [P,d]} or AFSPL's fused prompt
{"global", "local": [P,d], "gate_weight" [3,D], "gate_bias" [3], "modality_weight" [P*d,D],
"modality_bias" [P*d]}: w_g * global + w_l * local + w_m * modality(f) with (w_g, w_l, w_m) =
softmax(gate(f)) on the image feature f. `fused_prompts` is the torch twin of
`edge_client.caption_prompts.prompts_for` (the numpy one generation uses); a test holds them equal.
`CaptionObjective` is the same loss as an `edge_client.training.Objective` (per example), so the
client half trains it with the shared plain and DP-SGD loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from edge_client.caption_tokenizer import CaptionTokenizer
from edge_client.captioner import Captioner
from edge_client.training import Inputs, Objective

Params = dict[str, torch.Tensor]


def fused_prompts(params: Params, image_features: torch.Tensor) -> torch.Tensor:
    """[N,P,d] prompts for image features [N,D] (see the module docstring)."""
    n = len(image_features)
    if "gate_weight" not in params:  # one shared prompt: "prompt", or AFSPL's global prompt alone
        shared = params["prompt"] if "prompt" in params else params["global"]
        return shared.expand(n, *shared.shape)
    weights = torch.softmax(image_features @ params["gate_weight"].T + params["gate_bias"], dim=1)
    modality = (image_features @ params["modality_weight"].T + params["modality_bias"]).view(
        n, *params["global"].shape
    )
    return (
        weights[:, 0, None, None] * params["global"]
        + weights[:, 1, None, None] * params["local"]
        + weights[:, 2, None, None] * modality
    )


class CaptionObjective(Objective):
    """Each example's mean token cross-entropy of its caption through the frozen captioner with
    the fused (or shared) prompt: inputs (image features [B,D], patch tokens [B,T,W]), labels
    token ids [B,L] (-100 = padding); the "logits" are the token logits [B,L,V]."""

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner

    def classify(self, shared: None, params: Params, inputs: Inputs) -> torch.Tensor:
        raise TypeError("a caption objective has no class logits")

    def losses(
        self, shared: None, params: Params, inputs: Inputs, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features, patches = inputs
        logits = self.captioner.label_logits(fused_prompts(params, features), features, patches, labels)
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        tokens = (labels != -100).sum(1).clamp(min=1)
        return per_token.sum(1) / tokens, logits


def init_prompt(tokens: int, d_model: int, std: float, generator: torch.Generator) -> torch.Tensor:
    return std * torch.randn(tokens, d_model, generator=generator)


def init_fused(global_prompt: torch.Tensor, image_dim: int, std: float, generator: torch.Generator) -> Params:
    """AFSPL's parts around a given global prompt: a local prompt, a gate that starts uniform and a
    modality generator that starts near zero."""
    tokens, d_model = global_prompt.shape
    return {
        "global": global_prompt.clone(),
        "local": init_prompt(tokens, d_model, std, generator),
        "gate_weight": torch.zeros(3, image_dim),
        "gate_bias": torch.zeros(3),
        "modality_weight": 1e-3 * torch.randn(tokens * d_model, image_dim, generator=generator),
        "modality_bias": torch.zeros(tokens * d_model),
    }


def caption_labels(tokenizer: CaptionTokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Label ids [N,L] padded with -100 (ignored by the loss), each ending with EOS."""
    ids = [tokenizer.encode(text) for text in captions]
    labels = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.int64)
    for row, seq in enumerate(ids):
        labels[row, : len(seq)] = torch.tensor(seq)
    return labels
