"""Training caption prompts on the device through the frozen captioner (transformers' T5 in torch).

The prompt is either one shared soft prompt {"prompt": [P,d]} or AFSPL's fused prompt
{"global", "local": [P,d], "gate_weight" [3,D], "gate_bias" [3], "modality_weight" [P*d,D],
"modality_bias" [P*d]}: w_g * global + w_l * local + w_m * modality(f) with (w_g, w_l, w_m) =
softmax(gate(f)) on the image feature f. `fused_prompts` is the torch twin of
`edge_client.caption_prompts.prompts_for` (the numpy one generation uses); a test holds them equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from edge_client.caption_tokenizer import CaptionTokenizer
from edge_client.captioner import Captioner
from edge_client.training import make_optimizer
from fedprompt.common.settings import TrainingSettings

Params = dict[str, torch.Tensor]


def fused_prompts(params: Params, image_features: torch.Tensor) -> torch.Tensor:
    """[N,P,d] prompts for image features [N,D] (see the module docstring)."""
    n = len(image_features)
    if "prompt" in params:
        return params["prompt"].expand(n, *params["prompt"].shape)
    weights = torch.softmax(image_features @ params["gate_weight"].T + params["gate_bias"], dim=1)
    modality = (image_features @ params["modality_weight"].T + params["modality_bias"]).view(
        n, *params["global"].shape
    )
    return (
        weights[:, 0, None, None] * params["global"]
        + weights[:, 1, None, None] * params["local"]
        + weights[:, 2, None, None] * modality
    )


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


def train_caption_prompts(
    captioner: Captioner,
    params: Params,
    features: np.ndarray,
    patches: np.ndarray,
    labels: torch.Tensor,
    settings: TrainingSettings,
    generator: torch.Generator,
    trainable: Sequence[str] | None = None,
) -> tuple[Params, float]:
    """`local_epochs` passes of the settings' optimiser over shuffled batches of the mean token
    cross-entropy; only `trainable` tensors (default all) move. Returns the tensors and the mean loss."""
    names = list(trainable if trainable is not None else params)
    tensors = {k: v.detach().clone().requires_grad_(k in names) for k, v in params.items()}
    optimizer = make_optimizer([tensors[k] for k in names], settings)
    features_t, patches_t = torch.from_numpy(features), torch.from_numpy(patches)
    losses = []
    for _ in range(settings.local_epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(settings.batch_size):
            prompt = fused_prompts(tensors, features_t[batch])
            trimmed = labels[batch][:, : int((labels[batch] != -100).sum(1).max())].contiguous()
            loss = captioner.loss(prompt, features_t[batch], patches_t[batch], trimmed)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return {k: v.detach() for k, v in tensors.items()}, float(np.mean(losses)) if losses else float("nan")
