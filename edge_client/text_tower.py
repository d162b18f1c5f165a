"""A frozen CLIP text tower in plain torch, rebuilt from a bundle's tensors.

Gradients cannot flow through an onnxruntime session, so prompt learning back-propagates through
this module instead. It is written for that job: no parameters (only buffers, so optimisers and
opacus never see them), fused attention via `scaled_dot_product_attention`, and dynamic sequence
length so that callers can cut sequences after the last EOT token (exact for a causal tower).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-5
ACTIVATIONS = ("gelu", "quick_gelu")


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
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown text-tower activation {self.act!r}; expected one of {ACTIVATIONS}")
        if self.pool != "eot":
            raise ValueError(f"unknown text-tower pooling {self.pool!r}; only 'eot' is supported")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by {self.heads} heads")

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> TextTowerSpec:
        return cls(**entry)

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class _FrozenBlock(nn.Module):
    """One residual attention block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), optional layer scale."""

    def __init__(self, spec: TextTowerSpec, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        for name, tensor in tensors.items():
            self.register_buffer(name.replace(".", "_"), tensor.detach().to(torch.float32).contiguous())
        self.activation = F.gelu if spec.act == "gelu" else _quick_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        width, heads = self.spec.width, self.spec.heads  # python ints keep the ONNX graph's shapes static
        h = F.layer_norm(x, (width,), self.ln_1_weight, self.ln_1_bias, LAYER_NORM_EPS)
        qkv = F.linear(h, self.attn_in_proj_weight, self.attn_in_proj_bias)
        q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=self.spec.causal)
        return self.after_attention(x, attended.transpose(1, 2).reshape(n, length, width))

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the block once attention has run ([N,L,W] with heads merged): output
        projection and MLP, each with its residual. Shared with the prompt encoder's partial blocks."""
        width = self.spec.width
        attended = F.linear(attended, self.attn_out_proj_weight, self.attn_out_proj_bias)
        if self.spec.layer_scale:
            attended = attended * self.ls_1_gamma
        x = x + attended
        h = F.layer_norm(x, (width,), self.ln_2_weight, self.ln_2_bias, LAYER_NORM_EPS)
        h = F.linear(
            self.activation(F.linear(h, self.mlp_c_fc_weight, self.mlp_c_fc_bias)), self.mlp_c_proj_weight
        )
        h = h + self.mlp_c_proj_bias
        if self.spec.layer_scale:
            h = h * self.ls_2_gamma
        return x + h


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
        self.blocks = nn.ModuleList(
            _FrozenBlock(spec, _block_tensors(tensors, f"transformer.resblocks.{i}."))
            for i in range(spec.layers)
        )

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


def _block_tensors(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one block, named relative to the block (e.g. 'attn.in_proj_weight')."""
    block = {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
    if not block:
        raise KeyError(f"no tensors named {prefix}* in the text tower")
    return block
