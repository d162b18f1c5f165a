"""The two towers of an open_clip model as exportable modules, and the checks that say when a tower
is something fedprompt cannot export (with the reason, for one clear line)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import LayerNorm, LayerScale, QuickGELU, ResidualAttentionBlock
from torch import nn

from edge_client.text_tower import LAYER_NORM_EPS, TextTowerSpec
from export.errors import UnsupportedModelError

EOT_POOLING = ("argmax", "eos")  # open_clip's two ways of reading the feature at the EOT token


@dataclass
class TextParts:
    """The pieces of a CLIP text transformer, wherever the model class keeps them."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: torch.Tensor
    attn_mask: torch.Tensor | None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 tensors under open_clip's CLIP names (docs/architecture.md, text_tower.safetensors)."""
        tensors = {
            "token_embedding.weight": self.token_embedding.weight,
            "positional_embedding": self.positional_embedding,
            **{f"transformer.{k}": v for k, v in self.transformer.state_dict().items()},
            **{f"ln_final.{k}": v for k, v in self.ln_final.state_dict().items()},
            "text_projection": self.text_projection,
        }
        return {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}


def text_parts(model: nn.Module) -> TextParts:
    """Find the text tower of a CLIP (attributes on the model) or CustomTextCLIP (`model.text`)."""
    owner = getattr(model, "text", model)
    missing = [
        a
        for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not hasattr(owner, a)
    ]
    if missing:
        raise UnsupportedModelError(
            f"text tower {type(owner).__name__} is not supported (only CLIP-style text transformers export; "
            f"it has no {', '.join(missing)})"
        )
    pool = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", None)
    if pool not in EOT_POOLING:
        raise UnsupportedModelError(f"text pooling {pool!r} is not supported (only pooling at the EOT token)")
    if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
        raise UnsupportedModelError("text towers with a class token or a padding mask are not supported")
    if not isinstance(getattr(owner, "text_projection", None), nn.Parameter):
        raise UnsupportedModelError("text towers without a plain projection matrix are not supported")
    return TextParts(
        owner.token_embedding,
        owner.positional_embedding,
        owner.transformer,
        owner.ln_final,
        owner.text_projection,
        owner.attn_mask,
    )


def text_tower_spec(parts: TextParts) -> TextTowerSpec:
    """The manifest's `text_tower` entry; refuses blocks that FrozenTextTower does not implement."""
    blocks = list(parts.transformer.resblocks)
    first = blocks[0]
    if not all(type(b) is ResidualAttentionBlock for b in blocks):
        raise UnsupportedModelError(
            f"text blocks of type {type(first).__name__} are not supported "
            "(only open_clip's ResidualAttentionBlock)"
        )
    norms = [parts.ln_final, *(m for b in blocks for m in (b.ln_1, b.ln_2))]
    if not all(isinstance(n, LayerNorm | nn.LayerNorm) and n.eps == LAYER_NORM_EPS for n in norms):
        raise UnsupportedModelError(
            f"text layer norms other than LayerNorm(eps={LAYER_NORM_EPS}) are not supported"
        )
    activation = first.mlp.gelu
    if isinstance(activation, QuickGELU):
        act = "quick_gelu"
    elif isinstance(activation, nn.GELU) and activation.approximate == "none":
        act = "gelu"
    else:
        raise UnsupportedModelError(f"text activation {activation!r} is not supported (gelu or quick_gelu)")
    return TextTowerSpec(
        layers=len(blocks),
        heads=first.attn.num_heads,
        width=parts.positional_embedding.shape[1],
        mlp_width=first.mlp.c_fc.out_features,
        act=act,
        layer_scale=isinstance(first.ls_1, LayerScale),
        causal=parts.attn_mask is not None,
    )


class TextEncoder(nn.Module):
    """(prompt_embeddings [N,L,W], eot_positions [N]) -> [N,D] with open_clip's own modules.

    The graph exported as text_encoder.onnx, and the torch reference that verify compares with.
    Positional embeddings and the causal mask are sliced to L inside the graph."""

    def __init__(self, parts: TextParts) -> None:
        super().__init__()
        self.transformer = parts.transformer
        self.ln_final = parts.ln_final
        self.positional_embedding = parts.positional_embedding
        self.text_projection = parts.text_projection
        self.register_buffer("attn_mask", parts.attn_mask, persistent=False)

    def forward(self, prompt_embeddings: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        length = prompt_embeddings.shape[1]
        x = prompt_embeddings + self.positional_embedding[:length]
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        pooled = x[torch.arange(x.shape[0]), eot_positions]
        return pooled @ self.text_projection


class ImageEncoder(nn.Module):
    """images [N,3,H,W] -> image features [N,D], unnormalised (open_clip's `encode_image`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)
