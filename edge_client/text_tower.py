"""A frozen CLIP text tower in plain torch, rebuilt from a bundle's tensors.

Gradients cannot flow through an onnxruntime session, so prompt learning back-propagates through
this module instead. It is written for that job: no parameters (only buffers, so optimisers and
opacus never see them), the residual blocks shared with the image tower
(`edge_client.residual_block`), and dynamic sequence length so that callers can cut sequences after
the last EOT token (exact for a causal tower).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_client.residual_block import LAYER_NORM_EPS, BlockSpec, frozen_blocks


@dataclass(frozen=True)
class TextTowerSpec:
    """The shape of a pre-LN CLIP text transformer, as stored in `manifest["text_tower"]`."""

    layers: int
    heads: int
    width: int
    mlp_width: int
    act: str = "gelu"
    layer_scale: bool = False
    pool: str = "eot"
    causal: bool = True

    def __post_init__(self) -> None:
        if self.pool != "eot":
            raise ValueError(f"unknown text-tower pooling {self.pool!r}; only 'eot' is supported")
        _ = self.block  # BlockSpec refuses an unknown activation or a width the heads do not divide

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> TextTowerSpec:
        return cls(**entry)

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def block(self) -> BlockSpec:
        return BlockSpec(self.width, self.heads, self.act, self.layer_scale, self.causal)


class FrozenTextTower(nn.Module):
    """(prompt_embeddings [N,L,W] float32, eot_positions [N] int64) -> text features [N,D].

    The same signature as `text_encoder.onnx`: positional embeddings are added here, features are
    not normalised. All tensors are buffers; only the inputs can require gradients.
    """

    def __init__(self, spec: TextTowerSpec, tensors: Mapping[str, torch.Tensor], eot_token_id: int) -> None:
        super().__init__()
        self.spec = spec
        self.eot_token_id = eot_token_id
        self.register_buffer("token_embedding", tensors["token_embedding.weight"].to(torch.float32))
        self.register_buffer("positional_embedding", tensors["positional_embedding"].to(torch.float32))
        self.register_buffer("ln_final_weight", tensors["ln_final.weight"].to(torch.float32))
        self.register_buffer("ln_final_bias", tensors["ln_final.bias"].to(torch.float32))
        self.register_buffer("text_projection", tensors["text_projection"].to(torch.float32))
        self.blocks = frozen_blocks(spec.block, spec.layers, tensors, "text")

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.text_projection.shape[1]

    def forward(self, prompt_embeddings: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        n, length, _ = prompt_embeddings.shape
        if length > self.context_length:
            raise ValueError(f"sequence length {length} exceeds the context length {self.context_length}")
        x = prompt_embeddings + self.positional_embedding[:length]
        for block in self.blocks:
            x = block(x)
        x = F.layer_norm(x, (self.spec.width,), self.ln_final_weight, self.ln_final_bias, LAYER_NORM_EPS)
        pooled = x[torch.arange(n, device=x.device), eot_positions]
        return pooled @ self.text_projection

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N,L,W] of token ids [N,L] (e.g. tokenised zero-shot class prompts)."""
        return F.embedding(token_ids, self.token_embedding)

    def eot_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Index of the first EOT token of each row of `token_ids` [N,L]."""
        return (token_ids == self.eot_token_id).int().argmax(dim=-1)

    def cut_length(self, eot_positions: torch.Tensor) -> int:
        """Sequence length that keeps every EOT: exact to cut to it when the tower is causal."""
        return int(eot_positions.max()) + 1 if self.spec.causal else self.context_length

    def encode_token_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Text features of tokenised text, with sequences cut after the last EOT where exact."""
        eot = self.eot_positions(token_ids)
        cut = token_ids[:, : self.cut_length(eot)]
        return self(self.embed_tokens(cut), eot)
