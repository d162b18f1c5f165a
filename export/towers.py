"""The towers of an open_clip model as exportable modules and tensors, and the checks that say when a
tower is something fedprompt cannot export (with the reason, for one clear line)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import LayerNorm, LayerScale, QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import nn

from edge_client.image_tower import ImageTowerSpec
from edge_client.residual_block import LAYER_NORM_EPS
from edge_client.text_tower import TextTowerSpec
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
    shape = _block_shape(blocks, [parts.ln_final], "text")
    return TextTowerSpec(
        layers=len(blocks),
        width=parts.positional_embedding.shape[1],
        causal=parts.attn_mask is not None,
        **shape,
    )


def image_tower_spec(model: nn.Module) -> ImageTowerSpec | None:
    """The spec of the model's ViT image tower for FrozenImageTower, None when the image tower is not
    open_clip's VisionTransformer (RN50, timm towers: no visual prompts). Refuses, in one line, a
    VisionTransformer variant that FrozenImageTower does not implement."""
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        return None
    refusals = {
        "attentional pooling": visual.attn_pool is not None,
        "layer norm after pooling (final_ln_after_pool)": visual.final_ln_after_pool,
        f"pooling {visual.pool_type!r} (only the class token)": visual.pool_type != "tok",
        "no layer norm before the transformer (no_ln_pre)": not isinstance(visual.ln_pre, nn.LayerNorm),
        "no output projection": not isinstance(visual.proj, nn.Parameter),
        "a bias on the patch embedding": visual.conv1.bias is not None,
        "a class embedding that is not one vector": tuple(visual.class_embedding.shape)
        != (visual.conv1.out_channels,),
    }
    refused = [what for what, present in refusals.items() if present]
    if refused:
        raise UnsupportedModelError(f"ViT image towers with {refused[0]} are not supported")
    blocks = list(visual.transformer.resblocks)
    shape = _block_shape(blocks, [visual.ln_pre, visual.ln_post], "image")
    spec = ImageTowerSpec(
        layers=len(blocks),
        width=visual.conv1.out_channels,
        image_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        output_dim=int(visual.proj.shape[1]),
        **shape,
    )
    if tuple(visual.positional_embedding.shape) != (spec.tokens + 1, spec.width):
        raise UnsupportedModelError("ViT image towers whose positional embedding is not one per token")
    return spec


def image_tower_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 tensors of the ViT image tower under open_clip's names (docs/architecture.md)."""
    return {k: v.detach().to(torch.float32).contiguous() for k, v in model.visual.state_dict().items()}


def _block_shape(blocks: list[nn.Module], norms: list[nn.Module], tower: str) -> dict[str, object]:
    """heads, mlp_width, act and layer_scale of a tower's residual blocks, which must be what
    `edge_client.residual_block` implements (open_clip's ResidualAttentionBlock, LayerNorm(eps=1e-5),
    gelu or quick_gelu)."""
    first = blocks[0]
    if not all(type(b) is ResidualAttentionBlock for b in blocks):
        raise UnsupportedModelError(
            f"{tower} blocks of type {type(first).__name__} are not supported "
            "(only open_clip's ResidualAttentionBlock)"
        )
    norms = [*norms, *(m for b in blocks for m in (b.ln_1, b.ln_2))]
    if not all(isinstance(n, LayerNorm | nn.LayerNorm) and n.eps == LAYER_NORM_EPS for n in norms):
        raise UnsupportedModelError(
            f"{tower} layer norms other than LayerNorm(eps={LAYER_NORM_EPS}) are not supported"
        )
    activation = first.mlp.gelu
    if isinstance(activation, QuickGELU):
        act = "quick_gelu"
    elif isinstance(activation, nn.GELU) and activation.approximate == "none":
        act = "gelu"
    else:
        raise UnsupportedModelError(
            f"{tower} activation {activation!r} is not supported (gelu or quick_gelu)"
        )
    return {
        "heads": first.attn.num_heads,
        "mlp_width": first.mlp.c_fc.out_features,
        "act": act,
        "layer_scale": isinstance(first.ls_1, LayerScale),
    }


class ImageEncoder(nn.Module):
    """images [N,3,H,W] -> image features [N,D], unnormalised (open_clip's `encode_image`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)
